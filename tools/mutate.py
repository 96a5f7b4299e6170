"""Mutation check of kanoclip/ and trainer/knowledge.py: does the test suite notice a wrong equation?

Each mutant is one textual change (file, old text, new text). The tree is copied once to a temporary
directory; each mutant is applied to that copy, the relevant tests run against it, the file is restored.
Your own tree is never edited. A mutant is "killed" when the tests fail, "survived" when they pass.

    .venv/bin/python tools/mutate.py                 # every mutant
    .venv/bin/python tools/mutate.py --only M1,M7    # some
    .venv/bin/python tools/mutate.py --list

The copy is imported ahead of any installed (or editable) Kano: it lies in a folder named `kano` whose parent
goes first on PYTHONPATH. A baseline run without a mutant must pass, and the script checks that the imported
kanoclip is the copy's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_TESTS = ["tests/test_equations.py", "tests/test_model.py", "tests/test_backbone.py"]
BACKBONE_TESTS = ["tests/test_backbone.py", "tests/test_equations.py", "tests/test_model.py"]
KNOWLEDGE_TESTS = ["tests/test_knowledge.py"]

# (id, file, old, new, what it breaks). M1-M7 break the model's core: map channels, global probability, softmax axis,
# adapter, Bi-CMCI and the knowledge loss.
MUTANTS: list[tuple[str, str, str, str, str]] = [
    ("M1", "kanoclip/model.py", "m_normal, m_abnormal = up[:, 0], up[:, 1]", "m_normal, m_abnormal = up[:, 1], up[:, 0]",
     "normal/abnormal map columns swapped"),
    ("M2", "kanoclip/model.py", "global_prob = g_logits.softmax(-1)[:, 1]", "global_prob = g_logits.softmax(-1)[:, 0]",
     "global probability from the normal column"),
    ("M3", "kanoclip/model.py", "stage_probs.append(logits.float().softmax(-1))", "stage_probs.append(logits.float().softmax(1))",
     "stage softmax over patches instead of {normal, abnormal}"),
    ("M4", "kanoclip/adapter.py", "self.up(torch.relu(self.pointwise(h)))", "self.up(self.pointwise(h))", "adapter ReLU removed"),
    ("M5", "kanoclip/bicmci.py", "p = p + self.t2v(p, t)", "p = p + self.t2v(p, p)", "text-to-visual replaced by visual self-attention"),
    ("M6", "kanoclip/model.py", "kd_loss(w_k, out.text_normal, out.text_abnormal)", "kd_loss(w_k, out.text_abnormal, out.text_normal)",
     "KD hinge sign flipped (at the call)"),
    ("M7", "kanoclip/model.py", "knowledge[k].to(out.text_normal.device) for k in out.classes]",
     "knowledge[k].to(out.text_normal.device) for k in out.classes[::-1]]", "w̄ᵏ taken from another class (in the loss)"),
    # -- model.py: eq. 9, 10, 12, 13 ------------------------------------------------------------------
    ("model-stage-sum", "kanoclip/model.py", "summed = grid.mean(1)", "summed = grid.sum(1)", "eq. 9 sum over stages, not normalised"),
    ("model-stage-last", "kanoclip/model.py", "summed = grid.mean(1)", "summed = grid[:, -1]", "eq. 9 last stage only"),
    ("model-eq10-sign", "kanoclip/model.py", "m_abnormal + 1 - m_normal, self.cfg.sigma", "m_abnormal + 1 + m_normal, self.cfg.sigma",
     "eq. 10 sign"),
    ("model-eq10-half", "kanoclip/model.py", "self.cfg.sigma) / 2   # eq. 10", "self.cfg.sigma)   # eq. 10", "eq. 10 without /2"),
    ("model-eq10-noblur", "kanoclip/model.py", "gaussian_blur(m_abnormal + 1 - m_normal, self.cfg.sigma) / 2",
     "(m_abnormal + 1 - m_normal) / 2", "eq. 10 without G_σ"),
    ("model-eq10-sigma", "kanoclip/model.py", "m_abnormal + 1 - m_normal, self.cfg.sigma)", "m_abnormal + 1 - m_normal, 2 * self.cfg.sigma)",
     "eq. 10 wrong σ"),
    ("model-upsample-nearest", "kanoclip/model.py", 'mode="bilinear", align_corners=False', 'mode="nearest"', "nearest upsampling"),
    ("model-upsample-corners", "kanoclip/model.py", 'mode="bilinear", align_corners=False', 'mode="bilinear", align_corners=True',
     "align_corners=True"),
    ("model-score-mean", "kanoclip/model.py", "(global_prob + anomaly_map.flatten(1).amax(1)) / 2", "(global_prob + anomaly_map.flatten(1).mean(1)) / 2",
     "eq. 12 mean of M instead of max"),
    ("model-score-global-only", "kanoclip/model.py", "(global_prob + anomaly_map.flatten(1).amax(1)) / 2", "global_prob",
     "eq. 12 without max M"),
    ("model-no-adapter-call", "kanoclip/model.py", "glob = self.adapter(glob)", "glob = glob", "eq. 11 adapter never applied"),
    ("model-no-map-scale", "kanoclip/model.py", "logits = scale * torch.einsum", "logits = torch.einsum", "patch-text temperature dropped"),
    ("model-map-scale", "kanoclip/model.py", 'torch.tensor(1 / 0.07)', 'torch.tensor(1 / 0.01)', "patch-text temperature 100"),
    ("model-no-patch-norm", "kanoclip/model.py", 'torch.einsum("nld,nkd->nlk", F.normalize(p, dim=-1)', 'torch.einsum("nld,nkd->nlk", p',
     "patch features not normalised"),
    ("model-text-norm-dim", "kanoclip/model.py", "F.normalize(t, dim=-1))", "F.normalize(t, dim=1))", "text normalised over the wrong axis"),
    ("model-no-global-norm", "kanoclip/model.py", "F.normalize(glob, dim=-1)", "glob", "global feature not normalised"),
    ("model-global-scale-clamp", "kanoclip/model.py", ".exp().clamp(max=100.0)", ".exp().clamp(max=10.0)", "global temperature capped at 10"),
    ("model-text-stack-swap", "kanoclip/model.py", "torch.stack([w_n, w_a], dim=1)[idx]", "torch.stack([w_a, w_n], dim=1)[idx]",
     "text columns swapped at the source"),
    ("model-class-index", "kanoclip/model.py", "[classes.index(c) for c in class_names]", "[0 for c in class_names]",
     "every image gets the first class's prompts"),
    ("model-stage-map-col", "kanoclip/model.py", "grid[..., 1], global_prob", "grid[..., 0], global_prob", "stage maps from the normal column"),
    ("model-loss-alpha", "kanoclip/model.py", 'c.alpha * terms["kd"]', 'c.beta * terms["kd"]', "eq. 13 wrong weight"),
    ("model-loss-gamma", "kanoclip/model.py", 'c.gamma * terms["local"]', 'c.alpha * terms["local"]', "eq. 13 wrong weight"),
    ("model-bce-on-score", "kanoclip/model.py", "global_loss(out.global_prob, labels)", "global_loss(out.image_score, labels)",
     "BCE on the combined score"),
    ("model-local-args", "kanoclip/model.py", "local_loss(out.map_abnormal, out.map_normal, masks", "local_loss(out.map_normal, out.map_abnormal, masks",
     "eq. 15 maps swapped"),
    ("gauss-denominator", "kanoclip/model.py", "torch.exp(-(t ** 2) / (2 * sigma ** 2))", "torch.exp(-(t ** 2) / (sigma ** 2))",
     "Gaussian kernel too narrow"),
    ("gauss-radius", "kanoclip/model.py", "int(math.ceil(3 * sigma))", "int(math.ceil(2 * sigma))", "Gaussian truncated at 2σ"),
    ("gauss-border", "kanoclip/model.py", '(pad_w, pad_w, 0, 0), mode="reflect"', '(pad_w, pad_w, 0, 0), mode="replicate"',
     "Gaussian border mode"),
    # -- losses.py ----------------------------------------------------------------------------------
    ("focal-weight", "kanoclip/losses.py", "-(1 - p_t) ** gamma", "-(p_t) ** gamma", "focal modulating factor inverted"),
    ("dice-two", "kanoclip/losses.py", "(2 * (p * t).sum(1) + smooth)", "((p * t).sum(1) + smooth)", "Dice without the 2"),
    ("dice-smooth", "kanoclip/losses.py", "smooth: float = 1.0", "smooth: float = 0.0", "Dice without smoothing"),
    ("local-normal-target", "kanoclip/losses.py", "dice_loss(map_normal, 1 - mask)", "dice_loss(map_normal, mask)", "eq. 15 Dice(Mⁿ, G)"),
    ("bce-labels", "kanoclip/losses.py", "labels.float())", "1 - labels.float())", "BCE against inverted labels"),
    # -- prompts.py ---------------------------------------------------------------------------------
    ("kd-sign", "kanoclip/prompts.py", "(k - a).norm(dim=-1) - (k - n).norm(dim=-1)", "(k - n).norm(dim=-1) - (k - a).norm(dim=-1)",
     "KD hinge sign flipped (in kd_loss)"),
    ("kd-no-relu", "kanoclip/prompts.py", "return F.relu((k - a).norm(dim=-1) - (k - n).norm(dim=-1)).mean()",
     "return ((k - a).norm(dim=-1) - (k - n).norm(dim=-1)).mean()", "KD without the hinge"),
    ("kd-no-normalise", "kanoclip/prompts.py", "F.normalize(t.float(), dim=-1) for t in (w_k, w_n, w_a)", "t.float() for t in (w_k, w_n, w_a)",
     "KD on unnormalised vectors"),
    ("kd-sum", "kanoclip/prompts.py", "(k - n).norm(dim=-1)).mean()", "(k - n).norm(dim=-1)).sum()", "KD summed over classes"),
    ("prompt-feats-swap", "kanoclip/prompts.py", "return feats[:, :nw].mean(1), feats[:, nw:].mean(1)",
     "return feats[:, nw:].mean(1), feats[:, :nw].mean(1)", "normal/abnormal prompt features swapped"),
    ("prompt-first-word", "kanoclip/prompts.py", "return feats[:, :nw].mean(1), feats[:, nw:].mean(1)",
     "return feats[:, 0], feats[:, nw]", "one state word instead of the mean"),
    ("prompt-ctx-swap", "kanoclip/prompts.py", "ctx = torch.cat([self.ctx_normal.expand(nw, -1, -1), self.ctx_abnormal.expand(na, -1, -1)])",
     "ctx = torch.cat([self.ctx_abnormal.expand(nw, -1, -1), self.ctx_normal.expand(na, -1, -1)])", "learnable contexts swapped"),
    ("tower-argmin", "kanoclip/prompts.py", "tokens.argmax(dim=-1)]", "tokens.argmin(dim=-1)]", "pooling at the wrong token"),
    ("tower-no-pos", "kanoclip/prompts.py", "x = embeds + m.positional_embedding.to(embeds.dtype)", "x = embeds",
     "text positional embedding dropped"),
    ("tower-no-ln", "kanoclip/prompts.py", "x = m.ln_final(x)", "x = x", "ln_final dropped"),
    ("kvec-first", "kanoclip/prompts.py", "return features.mean(0)", "return features[0]", "w̄ᵏ = first description only"),
    ("fixed-swap", "kanoclip/prompts.py", "self._cache[c] = (f[i], f[len(missing) + i])", "self._cache[c] = (f[len(missing) + i], f[i])",
     "fixed prompts swapped"),
    # -- bicmci.py ----------------------------------------------------------------------------------
    ("bica-v2t-self", "kanoclip/bicmci.py", "t = t + self.v2t(t, p)", "t = t + self.v2t(t, t)", "visual-to-text replaced by text self-attention"),
    ("bica-no-sa-v", "kanoclip/bicmci.py", "p = p + self.sa_v(p)", "p = p", "visual self-attention dropped"),
    ("bica-no-sa-t", "kanoclip/bicmci.py", "t = t + self.sa_t(t)", "t = t", "text self-attention dropped"),
    ("bica-no-dsa", "kanoclip/bicmci.py", "p = p + self.dsa(self.ln_d(p), hw)", "p = p", "deformable attention dropped"),
    ("bica-order", "kanoclip/bicmci.py", "p = p + self.t2v(p, t)   # text-to-visual: visual parts gather the text they match\n        t = t + self.v2t(t, p)",
     "t = t + self.v2t(t, p)\n        p = p + self.t2v(p, t)", "visual-to-text before text-to-visual"),
    ("bica-no-residual", "kanoclip/bicmci.py", "return patches + self.up_v(p), text + self.up_t(t)", "return self.up_v(p), text + self.up_t(t)",
     "no residual to CLIP space"),
    ("bica-text-unchanged", "kanoclip/bicmci.py", "return patches + self.up_v(p), text + self.up_t(t)", "return patches + self.up_v(p), text",
     "text output ignored"),
    ("attn-cross-as-self", "kanoclip/bicmci.py", "kv = q if self.ln_kv is None else self.ln_kv(ctx)", "kv = q", "cross-attention becomes self-attention"),
    ("dsa-no-tanh", "kanoclip/bicmci.py", "torch.tanh(offsets.permute(0, 2, 3, 1))", "offsets.permute(0, 2, 3, 1)", "offsets unbounded"),
    ("dsa-indexing", "kanoclip/bicmci.py", 'torch.meshgrid(xs, ys, indexing="xy")', 'torch.meshgrid(ys, xs, indexing="ij")',
     "reference grid as (y, x)"),
    ("dsa-corners", "kanoclip/bicmci.py", 'mode="bilinear", align_corners=True)', 'mode="bilinear", align_corners=False)',
     "sampling with align_corners=False"),
    ("dsa-no-scale", "kanoclip/bicmci.py", "* self.offset_range * scale", "* self.offset_range", "offsets in normalised units"),
    ("dsa-kv-swap", "kanoclip/bicmci.py", "F.scaled_dot_product_attention(split(q), split(k), split(v))",
     "F.scaled_dot_product_attention(split(q), split(v), split(k))", "keys and values swapped"),
    ("dsa-offset-xy", "kanoclip/bicmci.py", "scale = torch.tensor([2.0 / max(wk - 1, 1), 2.0 / max(hk - 1, 1)]",
     "scale = torch.tensor([2.0 / max(hk - 1, 1), 2.0 / max(wk - 1, 1)]", "offset scale axes swapped"),
    ("linear-head-identity", "kanoclip/bicmci.py", "return self.proj(patches), text", "return patches, text", "ablation head skips its projection"),
    # -- adapter.py ---------------------------------------------------------------------------------
    ("adapter-no-residual", "kanoclip/adapter.py", "return x + self.up(", "return self.up(", "adapter without the residual"),
    ("adapter-no-ln", "kanoclip/adapter.py", "self.depthwise(self.ln(x).unsqueeze(1))", "self.depthwise(x.unsqueeze(1))", "adapter without LN"),
    ("adapter-no-depthwise", "kanoclip/adapter.py", "h = self.depthwise(self.ln(x).unsqueeze(1)).squeeze(1)", "h = self.ln(x)",
     "adapter without the depthwise conv"),
    ("adapter-bottleneck", "kanoclip/adapter.py", "max(8, dim // 4)", "max(8, dim // 2)", "d_bottle = D/2"),
    # -- backbone.py (CLIP-VV) --------------------------------------------------------------------------
    ("vv-is-qk", "kanoclip/backbone.py", "ov = F.scaled_dot_product_attention(vh, vh, vh)",
     "ov = F.scaled_dot_product_attention(self._heads(q, h), self._heads(k, h), vh)", "V-V attention replaced by Q-K"),
    ("vv-no-accumulate", "kanoclip/backbone.py", "s = s + attn.out_proj(ov", "s = attn.out_proj(ov", "V-V stream without its residual"),
    ("vv-start-late", "kanoclip/backbone.py", "if vv and i >= self.vv_start:", "if vv and i > self.vv_start:", "V-V starts a block late"),
    ("vv-keep-original", "kanoclip/backbone.py", "keep.append(s if (vv and s is not None) else x)", "keep.append(x)",
     "maps from the original stream"),
    ("vv-no-ln-post", "kanoclip/backbone.py", "t = v.ln_post(t[:, 1:])", "t = t[:, 1:]", "patch tokens without ln_post"),
    ("vv-cls-kept", "kanoclip/backbone.py", "t = v.ln_post(t[:, 1:])", "t = v.ln_post(t[:, :-1])", "CLS token among the patches"),
    ("spread-stages", "kanoclip/backbone.py", "round(depth * (i + 1) / n)", "round(depth * i / n)", "stages shifted"),
    # -- trainer/knowledge.py ---------------------------------------------------------------------------
    ("K-other-class", "trainer/knowledge.py", "[cached[t] for t in ts]", "[cached[t] for t in texts_per_class[classes[0]]]",
     "w̄ᵏ taken from another class (in knowledge_vectors)"),
    ("K-default-builtin", "trainer/knowledge.py", 'DEFAULT_SOURCES = ("llm", "vqa")', 'DEFAULT_SOURCES = ("llm", "vqa", "builtin")',
     "built-in pack mixed in by default"),
    ("K-always-fallback", "trainer/knowledge.py", "if sources is None and not any(by_source.values()):", "if sources is None:",
     "fallback even when LLM/VQA text exists"),
    ("K-no-fallback-flag", "trainer/knowledge.py", "fallback = any(by_source.values())", "fallback = False", "fallback not reported"),
    ("K-features-misassigned", "trainer/knowledge.py", "zip(todo, feats)}", "zip(todo, feats.flip(0))}", "features paired with the wrong texts"),
    ("K-ignore-explicit", "trainer/knowledge.py", "asked = sources or DEFAULT_SOURCES", "asked = DEFAULT_SOURCES", "explicit sources ignored"),
]


def tests_for(path: str) -> list[str]:
    if path.startswith("trainer/"):
        return KNOWLEDGE_TESTS
    if path.endswith("backbone.py"):
        return BACKBONE_TESTS
    return MODEL_TESTS


def prepare(tmp: Path) -> tuple[Path, Path]:
    """Copy the tree into TMP/site/kano: the repository root is the `kano` package, so TMP/site on PYTHONPATH
    makes the copy what `import kano` finds, ahead of an editable install (whose finder comes last)."""
    site = tmp / "site"
    tree = site / "kano"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", ".pytest_cache",
                                                              "runs", "demo_out", "build"))
    return tree, site


def run_tests(tree: Path, site: Path, tests: list[str], timeout: int) -> tuple[bool, float, str]:
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        lines = (r.stdout + r.stderr).strip().splitlines()
        first = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]   # the test that caught it
        ok, tail = r.returncode == 0, (first or lines[-1:] or [""])
    except subprocess.TimeoutExpired:
        ok, tail = False, ["timeout"]
    return ok, time.perf_counter() - t0, tail[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    chosen = MUTANTS
    if args.only:
        want = args.only.split(",")
        chosen = [m for m in MUTANTS if m[0] in want]
        unknown = sorted(set(want) - {m[0] for m in chosen})
        if unknown:
            sys.exit(f"--only must name mutant ids (see --list), got {', '.join(unknown)}")
    if args.list:
        for mid, path, _, _, what in chosen:
            print(f"{mid:26s} {path:22s} {what}")
        return 0
    stale = [m[0] for m in chosen if (ROOT / m[1]).read_text().count(m[2]) != 1]
    if stale:
        sys.exit(f"mutants must match their file exactly once; stale (the code moved): {', '.join(stale)}")
    with tempfile.TemporaryDirectory(prefix="kano-mutate-") as td:
        tree, site = prepare(Path(td))
        env = dict(os.environ, PYTHONPATH=str(site))
        where = subprocess.run([sys.executable, "-c", "import kano.kanoclip as k, kano.trainer as t; print(k.__file__, t.__file__)"],
                               cwd=site, env=env, capture_output=True, text=True).stdout.split()
        if not where or not all(w.startswith(td) for w in where):
            sys.exit(f"the copy must be what Python imports, got {where}")
        if not args.skip_baseline:
            files = sorted({t for m in chosen for t in tests_for(m[1])})
            ok, secs, tail = run_tests(tree, site, files, args.timeout)
            print(f"baseline (no mutant): {'pass' if ok else 'FAIL'} in {secs:.0f}s  {tail}", flush=True)
            if not ok:
                return 2
        rows = []
        for mid, path, old, new, what in chosen:
            f = tree / path
            original = f.read_text()
            f.write_text(original.replace(old, new, 1))
            try:
                passed, secs, tail = run_tests(tree, site, tests_for(path), args.timeout)
            finally:
                f.write_text(original)
            status = "survived" if passed else "killed"
            rows.append((mid, path, what, status, secs))
            print(f"{mid:26s} {status:8s} {secs:5.0f}s  {what}  [{tail[:90]}]", flush=True)
    killed = sum(r[3] == "killed" for r in rows)
    print(f"\n| mutant | file | change | result |\n|---|---|---|---|")
    for mid, path, what, status, _ in rows:
        print(f"| {mid} | {path} | {what} | {status} |")
    print(f"\nkilled {killed} / {len(rows)}; survived: {', '.join(r[0] for r in rows if r[3] == 'survived') or 'none'}")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
