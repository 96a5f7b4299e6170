"""Pretrain the micro-CLIP (kanoclip/micro/) on the captioned world of bench/micro_world.py.

With --world-share F, a share F of each batch comes from the auxiliary classes of anomaly_data/world.py
with their seen defect kinds described in words (never a target class, never a held-out kind). The shipped
weights use the defaults: 300 steps of 96, world share 0.5, dense weight 3 (811 s alone on two cores; docs/methods-results.md).

    OMP_NUM_THREADS=2 python bench/pretrain_micro.py            # writes kanoclip/micro/{micro_clip.safetensors,config.json}
    python bench/pretrain_micro.py --eval-only                  # re-measure the shipped weights

The model is open_clip's CLIP built from kanoclip/micro/kano-micro.json (ViT, patch 8, 96 px; a
4-layer text transformer over open_clip's own BPE vocabulary). Objective, per batch of captioned images:

- the CLIP contrastive loss (symmetric InfoNCE, learned temperature) between images and their captions;
  identical captions in a batch are treated as positives of each other;
- a caption-derived condition term: the global image feature against two phrases of its own class, one
  normal ("a flawless canvas."), one abnormal (its defect in words, or a generic "a damaged canvas." for a
  flawless image), cross-entropy on which one it is;
- the same two-phrase choice per patch, on the patch tokens the Kano pipeline reads (the CLIP-VV stream at
  every stage, through ln_post and proj, temperature 1/0.07 as in the maps), with the share of the patch
  covered by the defect mask as the soft target. Real CLIP's V-V tokens carry local semantics that emerge at
  scale; a 15-minute model is taught them, so the CLIP-VV row of an ablation in this world is by construction.

Deterministic for a given --seed on a given torch build (images are pure functions of (seed, index)).
Prints held-out image-text retrieval (R@1/R@5 both ways) and zero-shot flawless-vs-damaged image AUROC
and pixel AUROC on the classes of anomaly_data/synth.py, which this world never shows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import micro_world as W  # noqa: E402

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
MAP_SCALE = 1 / 0.07  # the pipeline's fixed patch-text temperature (kanoclip/model.py)


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD


def batch(seed: int, start: int, n: int, size: int, p_defect: float = 0.5, world_share: float = 0.0):
    """n captioned images; the first round(n * world_share) from the world's auxiliary classes."""
    k = int(round(n * world_share))
    out = [W.world_sample(seed, start + i, size, p_defect) for i in range(k)] + [W.sample(seed, start + i, size, p_defect) for i in range(k, n)]
    imgs = np.stack([o[0] for o in out])
    masks = torch.from_numpy(np.stack([o[1] for o in out])).float()
    return imgs, masks, [o[2] for o in out], [o[3] for o in out], [o[4] for o in out], [o[5] for o in out]


def encode_texts(model, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Unique texts encoded once: -> (U, E) features and the index of each input text."""
    import open_clip

    uniq = sorted(set(texts))
    pos = {t: i for i, t in enumerate(uniq)}
    feats = model.encode_text(open_clip.tokenize(uniq, context_length=model.context_length))
    return feats, [pos[t] for t in texts]


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1, n0 = y.sum(), (~y).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def losses(bb, model, x, masks, caps, nph, aph, dense_weight: float, cond_weight: float):
    feats = bb(x, vv=True)
    img = F.normalize(feats.global_feature, dim=-1)
    t_all, idx = encode_texts(model, caps + nph + aph)
    t_all = F.normalize(t_all, dim=-1)
    n = len(caps)
    ci, ni, ai = idx[:n], idx[n:2 * n], idx[2 * n:]
    tc = t_all[ci]
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ tc.t()
    same = torch.tensor([[a == b for b in ci] for a in ci], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    l_clip = (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.t().log_softmax(1), 1).mean()) / 2
    pair = torch.stack([t_all[ni], t_all[ai]], 1)                                  # (N, 2, E)
    bad = torch.tensor([m.any().item() for m in masks.bool()], dtype=torch.long)
    l_cond = F.cross_entropy(scale * torch.einsum("ne,nke->nk", img, pair), bad)
    grid = feats.patch_tokens[0].shape[1]
    side = int(math.isqrt(grid))
    frac = F.adaptive_avg_pool2d(masks[:, None], side).flatten(1)                  # (N, L) share of each patch
    soft = (frac / 0.3).clamp(0, 1)
    l_dense = 0.0
    for p in feats.patch_tokens:
        lg = MAP_SCALE * torch.einsum("nle,nke->nlk", F.normalize(p, dim=-1), pair)
        pa = lg.log_softmax(-1)
        l_dense = l_dense - (soft * pa[..., 1] + (1 - soft) * pa[..., 0]).mean()
    l_dense = l_dense / len(feats.patch_tokens)
    total = l_clip + cond_weight * l_cond + dense_weight * l_dense
    return total, {"clip": float(l_clip.detach()), "cond": float(l_cond.detach()), "dense": float(l_dense.detach())}


@torch.no_grad()
def retrieval(bb, model, seed: int, n: int, size: int) -> dict:
    imgs, masks, caps, _, _, _ = batch(seed + 7_000_003, 0, n, size)  # another seed: images and captions never trained on
    feats = []
    for i in range(0, n, 100):
        feats.append(F.normalize(bb(to_tensor(imgs[i:i + 100]), vv=True).global_feature, dim=-1))
    img = torch.cat(feats)
    t, idx = encode_texts(model, caps)
    txt = F.normalize(t, dim=-1)[idx]
    sim = img @ txt.t()
    caps_arr = np.array(caps)

    def recall(s, k):  # a hit when the retrieved caption is the same text as the true one (duplicates allowed)
        top = s.topk(k, dim=1).indices.numpy()
        return float(np.mean([(caps_arr[top[i]] == caps_arr[i]).any() for i in range(len(caps_arr))]))

    def recall_t2i(s, k):
        top = s.t().topk(k, dim=1).indices.numpy()
        return float(np.mean([(caps_arr[top[i]] == caps_arr[i]).any() for i in range(len(caps_arr))]))

    return {"n": n, "unique_captions": len(set(caps)), "i2t_r1": recall(sim, 1), "i2t_r5": recall(sim, 5),
            "t2i_r1": recall_t2i(sim, 1), "t2i_r5": recall_t2i(sim, 5)}


def _load_set(root: Path, size: int):
    """Per class: (images uint8 (N, S, S, 3), labels (N,), masks (N, S, S), defect kinds) from MVTec layout + meta.json."""
    from PIL import Image

    meta = json.loads((root / "meta.json").read_text())["test"]
    for cls, samples in meta.items():
        imgs = np.stack([np.asarray(Image.open(root / s["img_path"]).convert("RGB").resize((size, size), Image.BICUBIC)) for s in samples])
        gt = np.stack([np.asarray(Image.open(root / s["mask_path"]).convert("L").resize((size, size), Image.NEAREST)) > 127
                       if s["mask_path"] else np.zeros((size, size), bool) for s in samples])
        yield cls, imgs, np.array([s["anomaly"] for s in samples]), gt, [s["specie_name"] for s in samples]


@torch.no_grad()
def zero_shot(bb, model, size: int, seed: int = 0) -> dict:
    """Flawless vs damaged, zero-shot, on classes the pretraining world never shows: the legacy classes of
    anomaly_data/synth.py and the world's target classes (anomaly_data/world.py), every defect kind."""
    import open_clip

    from kano.anomaly_data import synth

    tmp = Path(tempfile.mkdtemp(prefix="micro-zs-"))
    legacy = getattr(synth, "LEGACY_CLASSES", synth.TEXTURES + synth.OBJECTS)
    legacy_defects = getattr(synth, "LEGACY_DEFECTS", ("hole", "scratch", "stain", "crack", "missing", "colour"))
    sets = {"legacy synth classes": synth.synthesize(tmp / "legacy", list(legacy), seed=seed + 5, size=224, n_train=0, n_good=6,
                                                     n_per_defect=2, defects=tuple(legacy_defects))}
    try:
        from kano.anomaly_data.synth import synthesize_world

        sets["world target classes"] = synthesize_world(tmp / "world", split="target", seed=seed + 5, size=128, n_good=8, n_per_defect=2)
    except ImportError:
        pass
    pairs = {"flawless/damaged": ("a photo of a flawless {}.", "a photo of a damaged {}."),
             "normal/abnormal (fixed prompts, as kanoclip-untrained)": ("a photo of a normal {}.", "a photo of an abnormal {}.")}

    def text(tn, ta, word):
        tok = open_clip.tokenize([tn.format(word), ta.format(word)], context_length=model.context_length)
        return F.normalize(model.encode_text(tok), dim=-1)

    out = {}
    for set_name, root in sets.items():
        img_auc = {f"{k}{w}": [] for k in pairs for w in ("", ", class word 'object'")}
        pix = {"CLIP-VV tokens": [], "Q-K tokens": []}
        per_kind: dict[str, list[float]] = {}
        for cls, imgs, y, gt, kinds in _load_set(Path(root), size):
            x = to_tensor(imgs)
            f = bb(x, vv=True)
            g = F.normalize(f.global_feature, dim=-1)
            for key, (tn, ta) in pairs.items():
                for suffix, word in (("", cls), (", class word 'object'", "object")):
                    p = (100 * g @ text(tn, ta, word).t()).softmax(-1)[:, 1].numpy()
                    img_auc[key + suffix].append(auroc(y, p))
                    if key == "flawless/damaged" and not suffix:
                        for kind in sorted(set(kinds) - {"good"}):
                            sel = np.array([k in ("good", kind) for k in kinds])
                            per_kind.setdefault(kind, []).append(auroc(y[sel], p[sel]))
            t = text(*pairs["normal/abnormal (fixed prompts, as kanoclip-untrained)"], cls)
            for name, ff in (("CLIP-VV tokens", f), ("Q-K tokens", bb(x, vv=False))):
                maps = torch.stack([(MAP_SCALE * F.normalize(p, dim=-1) @ t.t()).softmax(-1)[..., 1] for p in ff.patch_tokens]).mean(0)
                side = int(math.isqrt(maps.shape[1]))
                up = F.interpolate(maps.view(-1, 1, side, side), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                if gt.any():
                    pix[name].append(auroc(gt.flatten(), up.numpy().flatten()))
        out[set_name] = {"classes": len(img_auc["flawless/damaged"]),
                         **{f"image_auroc {k}": float(np.nanmean(v)) for k, v in img_auc.items()},
                         **{f"pixel_auroc fixed-prompt map, {k}": float(np.nanmean(v)) for k, v in pix.items() if v},
                         "image_auroc flawless/damaged per defect kind": {k: round(float(np.nanmean(v)), 3) for k, v in sorted(per_kind.items())}}
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "kanoclip" / "micro"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dense-weight", type=float, default=3.0)
    ap.add_argument("--cond-weight", type=float, default=0.5)
    ap.add_argument("--world-share", type=float, default=0.5,
                    help="share of each batch drawn from anomaly_data/world.py's auxiliary classes (seen defect kinds only)")
    ap.add_argument("--scale-lr", type=float, default=None,
                    help="learning rate of the logit scale (log temperature) alone; default: --lr (the shipped weights' "
                         "recipe, under which it barely moves from 1/0.07)")
    ap.add_argument("--init", default=None, help="start from these micro-CLIP weights instead of random ones")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-retrieval", type=int, default=500)
    ap.add_argument("--eval-only", action="store_true", help="measure the weights in --out instead of training")
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    W.check_disjoint()

    import open_clip
    from safetensors.torch import save_file

    from kano.kanoclip import micro_clip
    from kano.kanoclip.backbone import Backbone

    out = Path(args.out)
    name = micro_clip.register()
    if args.eval_only:
        model = micro_clip.build(str(out / "micro_clip.safetensors"))
        bb = Backbone(model, "micro")
    else:
        if args.init:
            model = micro_clip.build(args.init).float()
        else:
            model = open_clip.create_model(name, pretrained=None)
            with torch.no_grad():
                model.token_embedding.weight.copy_(micro_clip.init_token_embedding(model.token_embedding.weight.shape[1], args.seed))
        bb = Backbone(model, "micro")            # the pipeline's own forward (CLIP-VV stream), trained through here
        for p in model.parameters():
            p.requires_grad_(True)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n) and n != "logit_scale"]
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0},
                  {"params": [model.logit_scale], "weight_decay": 0.0, "lr": args.scale_lr or args.lr}]
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
        warm = max(1, args.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        size = bb.image_size
        t0 = time.perf_counter()
        gen_s = 0.0
        for step in range(args.steps):
            tg = time.perf_counter()
            imgs, masks, caps, nph, aph, _ = batch(args.seed, step * args.batch_size, args.batch_size, size, world_share=args.world_share)
            x = to_tensor(imgs)
            gen_s += time.perf_counter() - tg
            model.train()
            loss, parts = losses(bb, model, x, masks, caps, nph, aph, args.dense_weight, args.cond_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if step % args.log_every == 0 or step == args.steps - 1:
                el = time.perf_counter() - t0
                print(f"step {step + 1}/{args.steps} loss {float(loss):.3f} clip {parts['clip']:.3f} cond {parts['cond']:.3f} "
                      f"dense {parts['dense']:.3f} T {model.logit_scale.exp().item():.1f} {el:.0f}s (data {gen_s:.0f}s)", flush=True)
        wall = time.perf_counter() - t0
        model.eval()
        tensors, meta = micro_clip.pack_state_dict(model, args.seed)
        out.mkdir(parents=True, exist_ok=True)
        wpath = out / "micro_clip.safetensors"
        save_file(tensors, str(wpath), metadata=meta)
        model = micro_clip.build(str(wpath))   # measure what ships (float16 round trip), not the float32 in memory
        bb = Backbone(model, "micro")
    bb.eval()
    model.eval()
    t1 = time.perf_counter()
    ret = retrieval(bb, model, args.seed, args.n_retrieval, bb.image_size)
    zs = zero_shot(bb, model, bb.image_size)
    eval_s = time.perf_counter() - t1
    print("held-out retrieval:", json.dumps(ret))
    print("zero-shot on unseen classes:", json.dumps(zs, indent=1))
    wpath = out / "micro_clip.safetensors"
    n_params = sum(p.numel() for p in model.parameters())
    record = {"model_name": name, "weights": wpath.name, "sha256": micro_clip.sha256(wpath), "bytes": wpath.stat().st_size,
              "parameters": n_params, "image_size": bb.image_size, "patch_size": bb.patch_size, "stages": bb.stages,
              "retrieval": ret, "zero_shot": zs, "eval_seconds": round(eval_s, 1)}
    if not args.eval_only:
        record["pretrain"] = {"command": "OMP_NUM_THREADS=2 python bench/pretrain_micro.py " + " ".join(argv or sys.argv[1:]),
                              "args": vars(args), "wall_seconds": round(wall, 1), "data_seconds": round(gen_s, 1),
                              "images_seen": args.steps * args.batch_size, "git_commit": git_commit(),
                              "torch": torch.__version__, "open_clip": open_clip.__version__,
                              "load": os.getloadavg()[0], "cpu_threads": args.threads}
    else:
        old = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
        if "pretrain" in old:
            record["pretrain"] = old["pretrain"]
    (out / "config.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{wpath}: {record['bytes'] / 1e6:.2f} MB, {n_params / 1e6:.2f} M parameters, sha256 {record['sha256'][:16]}...")
    if not args.eval_only:
        print(f"pretraining wall time {wall:.0f}s ({args.steps * args.batch_size} images), load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
