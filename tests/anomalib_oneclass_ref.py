"""Reference outputs of anomalib's PatchcoreModel and PadimModel on given feature maps, run in the side venv that
has anomalib (never imports Kano).

    python tests/anomalib_oneclass_ref.py IN.safetensors OUT.safetensors

IN holds, for each method it names (keys "patchcore.KEY" and "padim.KEY", either or both; one call imports
anomalib once), the stage feature maps of the training images, "train.0", "train.1", ... (N, C, g, g), and of the test
images, "test.0", ... (M, C, g, g), and "image_size" (a 1-element tensor). Both models are anomalib 2.7.0's own,
built on a small timm backbone without weights whose feature extractor is then replaced by one that returns the
given maps (so every step after the CNN runs as released: pooling, embedding, fitting, scoring, maps). Given
besides, because anomalib draws them from its own random generator:

- patchcore: "projection" (d, D), the random projection for k-center greedy (anomalib's SparseRandomProjection is
  replaced by this matrix), "seed" (the global torch seed set right before the coreset is selected, which draws
  the start point), "ratio", "num_neighbors";
- padim: "channels" (d,), the channel subset (anomalib's `idx` buffer).

OUT ("METHOD.KEY"): patchcore: memory_bank, pred_score, anomaly_map; padim: mean, inv_covariance, pred_score, anomaly_map; each
also with the suffix "_f64": the same steps with float64 as torch's default dtype (anomalib's own round-off).
"""

import sys

import torch
from safetensors.torch import load_file, save_file


class GivenFeatures(torch.nn.Module):
    """Stands in for anomalib's TimmFeatureExtractor: returns the given maps of the batch it is called on."""

    def __init__(self, names, maps):
        super().__init__()
        self.names, self.maps = names, maps

    def forward(self, x):
        assert x.shape[0] == self.maps[0].shape[0], "one call per given batch"
        return {n: m.to(x.dtype) for n, m in zip(self.names, self.maps)}


def stage_maps(data, split):
    return [data[f"{split}.{i}"] for i in range(len([k for k in data if k.startswith(split + ".")]))]


def run_patchcore(data, dtype):
    import anomalib.models.image.patchcore.torch_model as tm
    from anomalib.models.components.sampling import k_center_greedy as kcg

    train, test = stage_maps(data, "train"), stage_maps(data, "test")
    names = ["layer2", "layer3"][: len(train)]
    model = tm.PatchcoreModel(layers=names, backbone="resnet18", pre_trained=False,
                              num_neighbors=int(data["num_neighbors"].item()))
    model = model.to(dtype)
    size = int(data["image_size"].item())
    model.train()
    model.feature_extractor = GivenFeatures(names, [t.to(dtype) for t in train])
    model(torch.zeros(train[0].shape[0], 3, size, size, dtype=dtype))

    projection = data["projection"].to(dtype)

    class GivenProjection:
        def fit(self, embedding):
            return self

        def transform(self, embedding):
            return embedding @ projection.T

    original = kcg.KCenterGreedy.__init__

    def init(self, embedding, sampling_ratio):
        original(self, embedding, sampling_ratio)
        self.model = GivenProjection()

    kcg.KCenterGreedy.__init__ = init
    try:
        torch.manual_seed(int(data["seed"].item()))
        model.subsample_embedding(float(data["ratio"].item()))
    finally:
        kcg.KCenterGreedy.__init__ = original
    model.eval()
    model.feature_extractor = GivenFeatures(names, [t.to(dtype) for t in test])
    with torch.no_grad():
        pred = model(torch.zeros(test[0].shape[0], 3, size, size, dtype=dtype))
    return {"memory_bank": model.memory_bank, "pred_score": pred.pred_score, "anomaly_map": pred.anomaly_map[:, 0]}


def run_padim(data, dtype):
    import anomalib.models.image.padim.torch_model as tm

    train, test = stage_maps(data, "train"), stage_maps(data, "test")
    names = ["layer1", "layer2", "layer3"][: len(train)]
    channels = data["channels"].long()
    model = tm.PadimModel(backbone="resnet18", layers=names, pre_trained=False, n_features=channels.numel()).to(dtype)
    model.idx = channels
    size = int(data["image_size"].item())
    model.train()
    model.feature_extractor = GivenFeatures(names, [t.to(dtype) for t in train])
    model(torch.zeros(train[0].shape[0], 3, size, size, dtype=dtype))
    model.fit()
    model.eval()
    model.feature_extractor = GivenFeatures(names, [t.to(dtype) for t in test])
    with torch.no_grad():
        pred = model(torch.zeros(test[0].shape[0], 3, size, size, dtype=dtype))
    return {"mean": model.gaussian.mean, "inv_covariance": model.gaussian.inv_covariance,
            "pred_score": pred.pred_score, "anomaly_map": pred.anomaly_map[:, 0]}


def main():
    inp, out = sys.argv[1:3]
    given = load_file(inp)
    res = {}
    for method, run in (("patchcore", run_patchcore), ("padim", run_padim)):
        data = {k.partition(".")[2]: v for k, v in given.items() if k.startswith(method + ".")}
        if not data:
            continue
        torch.set_default_dtype(torch.float32)
        res.update({f"{method}.{k}": v.float().contiguous() for k, v in run(data, torch.float32).items()})
        torch.set_default_dtype(torch.float64)
        res.update({f"{method}.{k}_f64": v.double().contiguous() for k, v in run(data, torch.float64).items()})
    save_file(res, out)


if __name__ == "__main__":
    main()
