"""Knowledge-driven prompt learning (eq. 1-3): learnable prefixes fed through CLIP's text tower.

P_n = [N_1]..[N_K][Normal][class],  P_a = [A_1]..[A_K][Abnormal][class]   (eq. 1)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kano.core.errors import KanoError

FIXED_NORMAL = "a photo of a normal {}."
FIXED_ABNORMAL = "a photo of an abnormal {}."
PLACEHOLDER = "X"


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    import open_clip

    return open_clip.tokenize(texts, context_length=context_length)


class TextTower(nn.Module):
    """CLIP's text transformer on given token embeddings (CoOp style); frozen weights."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        if getattr(clip_model, "text_pool_type", "argmax") != "argmax":
            raise KanoError(f"text tower pooling must be 'argmax' (OpenAI-style CLIP), got {clip_model.text_pool_type!r}")
        self.clip = [clip_model]  # a list: not registered, so its weights stay the backbone's alone

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip[0].token_embedding(tokens)

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor, before_block=None) -> torch.Tensor:
        """embeds (P, T, W), tokens (P, T) -> text features (P, E), not normalised.

        before_block(i, x) -> x, when given, rewrites the (P, T, W) input of text block i (0-based) before it runs:
        AnomalyCLIP's learnable tokens inside the encoder."""
        m = self.clip[0]
        x = embeds + m.positional_embedding.to(embeds.dtype)
        if before_block is None:
            x = m.transformer(x, attn_mask=m.attn_mask)
        else:
            nld = getattr(m.transformer, "batch_first", True)
            for i, block in enumerate(m.transformer.resblocks):
                x = before_block(i, x)
                x = block(x, attn_mask=m.attn_mask) if nld else block(x.transpose(0, 1), attn_mask=m.attn_mask).transpose(0, 1)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Plain `encode_text` of sentences -> (P, E), not normalised."""
        m = self.clip[0]
        dev = m.token_embedding.weight.device
        outs = [m.encode_text(tokenize(texts[i:i + batch_size], m.context_length).to(dev)) for i in range(0, len(texts), batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, m.text_projection.shape[-1], device=dev)


class PromptLearner(nn.Module):
    """LNPs and LAPs (eq. 1): K learnable prefix embeddings each, shared by all classes."""

    def __init__(self, tower: TextTower, n_ctx: int = 12, normal_words=("normal", "perfect"),
                 abnormal_words=("abnormal", "defective"), init_std: float = 0.02):
        super().__init__()
        self.tower = tower
        width = tower.clip[0].token_embedding.weight.shape[1]
        self.n_ctx = n_ctx
        self.normal_words, self.abnormal_words = tuple(normal_words), tuple(abnormal_words)
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, width) * init_std)
        self.ctx_abnormal = nn.Parameter(torch.randn(n_ctx, width) * init_std)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tokens(self, class_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (Wn+Wa, T) and their frozen embeddings for one class."""
        if class_name not in self._cache:
            prefix = " ".join([PLACEHOLDER] * self.n_ctx)
            texts = [f"{prefix} {w} {class_name}." for w in self.normal_words + self.abnormal_words]
            m = self.tower.clip[0]
            tokens = tokenize(texts, m.context_length).to(m.token_embedding.weight.device)
            if (tokens.argmax(-1) >= m.context_length - 1).any():
                raise KanoError(f"prompt for class {class_name!r} must fit CLIP's {m.context_length} tokens with K={self.n_ctx}, got too long")
            with torch.no_grad():
                emb = self.tower.embed(tokens)
            self._cache[class_name] = (tokens, emb)
        return self._cache[class_name]

    def forward(self, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (normal, abnormal) mean prompt features per class, each (C, E), not normalised (w̄ⁿ, w̄ᵃ)."""
        toks, embs = zip(*(self._tokens(c) for c in class_names))
        tokens, emb = torch.cat(toks), torch.cat(embs)
        nw, na = len(self.normal_words), len(self.abnormal_words)
        ctx = torch.cat([self.ctx_normal.expand(nw, -1, -1), self.ctx_abnormal.expand(na, -1, -1)])
        ctx = ctx.repeat(len(class_names), 1, 1).to(emb.dtype)
        emb = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1)
        feats = self.tower(emb, tokens).view(len(class_names), nw + na, -1)
        return feats[:, :nw].mean(1), feats[:, nw:].mean(1)


class FixedPrompts(nn.Module):
    """KnPL off: "a photo of a normal/abnormal [class]" through plain encode_text (no learnable part)."""

    def __init__(self, tower: TextTower):
        super().__init__()
        self.tower = tower
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in class_names if c not in self._cache]
        if missing:
            f = self.tower.encode([FIXED_NORMAL.format(c) for c in missing] + [FIXED_ABNORMAL.format(c) for c in missing])
            for i, c in enumerate(missing):
                self._cache[c] = (f[i], f[len(missing) + i])
        n, a = zip(*(self._cache[c] for c in class_names))
        return torch.stack(n), torch.stack(a)


class FreeTextVectors(nn.Module):
    """The language-free control: the normal and abnormal "text" features are two freely learned vectors
    (E,), shared by every class (VisualAD-style); no word reaches the text tower. The tower is kept only so
    that the knowledge vectors w̄ᵏ of a run can still be computed and logged like any other run's."""

    def __init__(self, tower: TextTower, embed_dim: int):
        super().__init__()
        self.tower = tower
        self.normal = nn.Parameter(torch.randn(embed_dim))
        self.abnormal = nn.Parameter(torch.randn(embed_dim))

    def forward(self, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        c = len(class_names)
        return self.normal.expand(c, -1), self.abnormal.expand(c, -1)


def knowledge_vector(features: torch.Tensor) -> torch.Tensor:
    """w̄ᵏ (eq. 3): the mean CLIP text feature of a class's LLM and VQA descriptions. (M, E) -> (E,)."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"knowledge features must be (M>0, E), got {tuple(features.shape)}")
    return features.mean(0)


def kd_loss(w_k: torch.Tensor, w_n: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    """Eq. 2, averaged over classes: max(0, d(k̂, â) - d(k̂, n̂)), d Euclidean, hats = L2-normalised. Inputs (C, E)."""
    k, n, a = (F.normalize(t.float(), dim=-1) for t in (w_k, w_n, w_a))
    return F.relu((k - a).norm(dim=-1) - (k - n).norm(dim=-1)).mean()
