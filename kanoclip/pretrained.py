"""Where a backbone's pretrained weights come from: an open_clip tag resolved in the Hugging Face cache (or
open_clip's own cache), a local file, or a download, decided before open_clip tries so that a machine without
network fails at once with the command that fetches them. The network and file look-ups of the factory
(`backbone.build_backbone`) live here, so that the nn.Module files stay free of I/O."""

from __future__ import annotations

import os

from kano.core.errors import KanoError

PROBE_TIMEOUT_S = 1.5  # how long to wait for the weights' server before calling the network absent


def _words(text: str, limit: int) -> str:
    """One line, at most `limit` characters, cut at a word boundary (never mid-word)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(",;:.") + " ..."


def _weight_source(name: str, pretrained: str) -> tuple[str | None, str | None, list[str]]:
    """(cached file or None, URL that would be fetched, where it was looked for) for an open_clip tag.

    Mirrors open_clip's own choice (`download_pretrained`): the Hugging Face Hub entry when there is one (its
    safetensors alternative first), else the plain URL cached under ~/.cache/clip."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for f in names:
            hit = try_to_load_from_cache(repo, f)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, None, [constants.HF_HUB_CACHE]
        return None, f"{constants.ENDPOINT}/{repo}/resolve/main/{names[-1]}", [constants.HF_HUB_CACHE]
    url = cfg.get("url", "")
    if url:
        folder = os.path.expanduser("~/.cache/clip")
        local = os.path.join(folder, os.path.basename(url))
        return (local if os.path.isfile(local) else None), url, [folder]
    return None, None, []


def _unreachable(url: str) -> str | None:
    """None when the server of `url` answers within PROBE_TIMEOUT_S, else why not (a short reason).

    One HEAD request, no redirects, no retries, in a daemon thread so that a hanging name lookup cannot
    hold the caller either (urllib's timeout does not cover DNS)."""
    import threading
    import urllib.error
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    result: dict = {}

    def probe():
        try:
            opener = urllib.request.build_opener(_NoRedirect)
            opener.open(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            result["ok"] = True
        except urllib.error.HTTPError:  # the server answered (a redirect, 401, 404): it is reachable
            result["ok"] = True
        except Exception as exc:
            reason = getattr(exc, "reason", exc)
            result["why"] = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.2)
    if result.get("ok"):
        return None
    return _words(result.get("why", f"no answer within {PROBE_TIMEOUT_S:g} s"), 120)


def _missing_weights(name: str, pretrained: str, where: list[str], why: str) -> KanoError:
    return KanoError(
        f"weights for {name} (pretrained {pretrained!r}) must be in the cache ({', '.join(where) or 'none known'}) "
        f"or a local file, got none there and {why}. Get them once on a machine with network: "
        f"python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\" "
        f"(then copy the cache folder), or pass a local file: --backbone {name}:/path/to/open_clip_model.safetensors. "
        f"Offline with no weights at all: --backbone micro (the shipped micro-CLIP, 8.2 M parameters, no download)")


def create_clip(name: str, pretrained: str | None, image_size: int | None):
    import open_clip

    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(name.split("-")[0].lower())][:12]
        raise KanoError(f"backbone model must be an open_clip model name, 'micro' or 'tiny', got {name!r}; e.g. {', '.join(close) or 'ViT-B-16-quickgelu'}")
    kwargs = {"force_image_size": image_size} if image_size else {}
    if pretrained is None:
        return open_clip.create_model(name, pretrained=None, **kwargs)
    is_file = os.path.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))
    if is_file and not os.path.isfile(pretrained):
        raise KanoError(f"backbone weights file must exist, got no such file: {pretrained}")
    if not is_file:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise KanoError(f"pretrained tag for {name} must be one of {', '.join(tags) or '(none)'} or a local file, got {pretrained!r}")
        # Decide before open_clip tries: its Hub download retries for about a minute without network and logs
        # every retry twice. A cached file is loaded directly (no network call at all); a missing one fails
        # at once when offline or when the server does not answer a single quick request.
        cached, url, where = _weight_source(name, pretrained)
        if cached:
            cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
            pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
            try:
                return open_clip.create_model(name, pretrained=cached, force_preprocess_cfg=pp, **kwargs)
            except Exception as exc:  # an interrupted download or a damaged disk leaves a file that does not load
                raise KanoError(
                    f"cached weights for {name} (pretrained {pretrained!r}) must be a complete weights file, got "
                    f"{type(exc).__name__}: {_words(str(exc), 160)} reading {cached}. Delete that file and download "
                    f"it again (python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\") "
                    f"or pass a local file: --backbone {name}:/path/to/open_clip_model.safetensors") from None
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise _missing_weights(name, pretrained, where, "HF_HUB_OFFLINE is set (no downloads)")
        why = _unreachable(url) if url else None
        if why:
            raise _missing_weights(name, pretrained, where, f"the download server does not answer ({why})")
    try:
        return open_clip.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        where = [pretrained] if is_file else _weight_source(name, pretrained)[2]
        raise KanoError(
            f"weights for {name} ({pretrained}) must load from {', '.join(where)}, got {type(exc).__name__}: "
            f"{_words(str(exc), 240)}. Download them once on a machine with network "
            f"(python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\") "
            f"or pass a local file: --backbone {name}:/path/to/open_clip_model.safetensors"
        ) from None
