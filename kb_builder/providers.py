"""Model providers behind one small interface: `complete(prompt, image, options) -> Reply`.

- `openai:MODEL`        any OpenAI-compatible chat endpoint (OpenAI, Ollama, vLLM, LM Studio, ...),
                        text or vision (image as a base64 PNG data URL).
- `transformers:MODEL`  Llama 3.2 Vision (Mllama) in-process, 4-bit through bitsandbytes on CUDA.
- `builtin`             the offline pack shipped with Kano (no calls; see builtin.py).
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass
from typing import Protocol

from kano.core.errors import KanoError

PROVIDERS = ("openai", "transformers", "builtin", "none")


@dataclass(frozen=True)
class Reply:
    text: str
    served_model: str | None
    input_tokens: int | None
    output_tokens: int | None


class ProviderError(Exception):
    """A failed call. `retryable` marks rate limits, server errors, timeouts and malformed replies."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class Provider(Protocol):
    provider: str
    model: str

    def complete(self, prompt: str, image: bytes | None, options: dict) -> Reply:
        """One chat completion. `image` is the raw bytes of an image file, or None for text only."""
        ...


def parse_spec(spec: str) -> tuple[str, str]:
    """'PROVIDER:MODEL' split at the first colon ('openai:llama3.2-vision:11b' keeps the tag)."""
    spec = (spec or "").strip()
    if spec in ("builtin", "none"):
        return spec, ""
    provider, sep, model = spec.partition(":")
    if not sep or not model or provider not in PROVIDERS:
        raise KanoError(
            f"model spec must be PROVIDER:MODEL with PROVIDER one of openai, transformers (or the words builtin, none), "
            f"got {spec!r}; e.g. openai:gpt-3.5-turbo, openai:llama3.2-vision, "
            "transformers:meta-llama/Llama-3.2-11B-Vision-Instruct"
        )
    return provider, model


def image_to_png(image: bytes, max_side: int = 1120) -> tuple[bytes, tuple[int, int]]:
    """Decode any PIL-readable image, convert to RGB PNG (downscaled to max_side). Raises ValueError if corrupt."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"not a readable image ({exc})") from None
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), rgb.size


def scrub(text: str, secrets) -> str:
    """`text` with every secret (API key) replaced by <redacted>: a server may echo the key in an error."""
    for key in secrets:
        if key and len(key) >= 4 and key in text:
            text = text.replace(key, "<redacted>")
    return text


# The key sent when a provider has none: servers without auth (Ollama) accept any, and it is no secret.
NO_KEY = "kano-no-key"


class OpenAIChatProvider:
    """Any server that speaks the OpenAI chat-completions API.

    `api_key` is the only key it sends (None: NO_KEY); it never reads the environment itself, so the
    caller decides which server gets which key. `timeout_s` bounds the whole request (connect, send,
    wait and the last byte of the reply), not each socket read: a server trickling bytes is cut off.
    """

    provider = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout_s: float = 60.0):
        import openai

        if not timeout_s > 0:
            raise KanoError(f"--timeout must be > 0 seconds, got {timeout_s}")
        self.model = model
        self.base_url = base_url
        self.timeout_s = float(timeout_s)
        self.secrets = tuple(k for k in (api_key,) if k)
        self._client = openai.OpenAI(api_key=api_key or NO_KEY, base_url=base_url, max_retries=0, timeout=timeout_s)
        self._openai = openai

    def _create(self, **kwargs):
        """One request under a total deadline. The client's own timeout applies per read, so a reply trickled
        a byte at a time would hold it for minutes; the request runs in a daemon thread that is abandoned
        (its socket still times out per read and closes) once the deadline passes."""
        box: dict = {}
        done = threading.Event()

        def run():
            try:
                box["resp"] = self._client.chat.completions.create(**kwargs)
            except BaseException as exc:  # handed to the caller's thread below
                box["exc"] = exc
            finally:
                done.set()

        threading.Thread(target=run, daemon=True, name="kano-request").start()
        if not done.wait(self.timeout_s):
            raise ProviderError(f"timeout: no complete reply within {self.timeout_s:g} s", retryable=True)
        if "exc" in box:
            raise box["exc"]
        return box["resp"]

    def complete(self, prompt: str, image: bytes | None, options: dict) -> Reply:
        if image is None:
            content: object = prompt
        else:
            png, _ = image_to_png(image)
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
        kwargs = {"temperature": float(options.get("temperature", 0.0))}
        if options.get("max_tokens"):
            kwargs["max_tokens"] = int(options["max_tokens"])
        if options.get("seed") is not None:
            kwargs["seed"] = int(options["seed"])
        oa = self._openai
        short = lambda exc: scrub(_short(exc), self.secrets)  # noqa: E731 -- an echoed key never leaves here
        try:
            resp = self._create(model=self.model, messages=[{"role": "user", "content": content}], **kwargs)
        except ProviderError:
            raise
        except oa.RateLimitError as exc:
            raise ProviderError(f"HTTP 429 rate limited: {short(exc)}", retryable=True) from None
        except oa.APITimeoutError:
            raise ProviderError(f"timeout: no reply within {self.timeout_s:g} s", retryable=True) from None
        except oa.APIConnectionError as exc:
            raise ProviderError(f"cannot connect to {self.base_url or 'the API'}: {short(exc)}", retryable=True) from None
        except oa.APIStatusError as exc:
            code = exc.status_code
            raise ProviderError(f"HTTP {code}: {short(exc)}", retryable=code >= 500 or code in (408, 409)) from None
        except Exception as exc:  # a reply the client could not parse
            raise ProviderError(f"malformed reply: {short(exc)}", retryable=True) from None
        try:
            text = resp.choices[0].message.content
            if not isinstance(text, str):
                raise TypeError("message content is not a string")
        except Exception as exc:
            raise ProviderError(f"malformed reply: {short(exc)}", retryable=True) from None
        text = scrub(text, self.secrets)
        usage = getattr(resp, "usage", None)
        return Reply(
            text=text,
            served_model=getattr(resp, "model", None) if isinstance(getattr(resp, "model", None), str) else None,
            input_tokens=getattr(usage, "prompt_tokens", None) if usage else None,
            output_tokens=getattr(usage, "completion_tokens", None) if usage else None,
        )


def _short(exc: BaseException, limit: int = 300) -> str:
    return " ".join(str(exc).split())[:limit]


class TransformersVisionProvider:
    """Llama 3.2 Vision (Mllama) in-process through transformers.

    On CUDA the model loads in 4-bit NF4 through bitsandbytes (`quantize="auto"` or "4bit"); on CPU it
    loads unquantised ("none"), which only suits small checkpoints. `model`/`processor` may be passed
    in directly (tests build a tiny random Mllama).
    """

    provider = "transformers"
    secrets: tuple = ()

    def __init__(self, model: str, quantize: str = "auto", device: str | None = None, hf_model=None, processor=None):
        if quantize not in ("auto", "4bit", "none"):
            raise KanoError(f"quantize must be one of auto, 4bit, none, got {quantize!r}")
        self.model = model
        self.quantize = quantize
        self.device = device
        self._model = hf_model
        self._processor = processor
        self._lock = threading.Lock()

    def _load(self):
        import torch

        try:
            from transformers import AutoProcessor, MllamaForConditionalGeneration
        except ImportError:
            raise KanoError("the transformers VQA provider needs transformers: pip install 'transformers>=4.45'") from None
        cuda = torch.cuda.is_available()
        quant = self.quantize if self.quantize != "auto" else ("4bit" if cuda else "none")
        kwargs: dict = {}
        if quant == "4bit":
            if not cuda:
                raise KanoError("4-bit loading must run on a CUDA GPU, got none: use --vqa openai:llama3.2-vision with a server, "
                                "or quantize none on a machine with enough memory")
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise KanoError("4-bit loading needs bitsandbytes: pip install 'kano[quant]' (or pip install bitsandbytes)") from None
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = "auto"
        else:
            kwargs["dtype"] = torch.bfloat16 if cuda else torch.float32
        try:
            self._processor = AutoProcessor.from_pretrained(self.model)
            self._model = MllamaForConditionalGeneration.from_pretrained(self.model, **kwargs)
        except OSError as exc:
            raise KanoError(f"cannot load {self.model} (weights must be in the Hugging Face cache or a local folder): {_short(exc)}") from None
        if quant != "4bit":
            self._model.to(self.device or ("cuda" if cuda else "cpu"))
        self._model.eval()

    def complete(self, prompt: str, image: bytes | None, options: dict) -> Reply:
        import torch
        from PIL import Image

        if image is None:
            raise ProviderError("the transformers provider serves VQA only: it needs an image", retryable=False)
        with self._lock:  # one generation at a time on one model
            if self._model is None:
                self._load()
            png, _ = image_to_png(image)
            pil = Image.open(io.BytesIO(png)).convert("RGB")
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text_in = self._processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self._processor(images=pil, text=text_in, add_special_tokens=False, return_tensors="pt").to(self._model.device)
            temperature = float(options.get("temperature", 0.0))
            if options.get("seed") is not None:
                torch.manual_seed(int(options["seed"]))
            gen = {"max_new_tokens": int(options.get("max_tokens") or 256), "do_sample": temperature > 0}
            if temperature > 0:
                gen["temperature"] = temperature
            with torch.inference_mode():
                out = self._model.generate(**inputs, **gen)
            n_in = inputs["input_ids"].shape[-1]
            new = out[0][n_in:]
            text = self._processor.decode(new, skip_special_tokens=True)
        return Reply(text=text, served_model=self.model, input_tokens=int(n_in), output_tokens=int(new.shape[-1]))


def make_provider(spec: str, base_url: str | None = None, api_key: str | None = None, timeout_s: float = 60.0) -> Provider | None:
    """Build the provider for a spec; None for 'builtin' and 'none' (no calls). `api_key` is the only key it sends."""
    provider, model = parse_spec(spec)
    if provider == "openai":
        return OpenAIChatProvider(model, base_url=base_url, api_key=api_key, timeout_s=timeout_s)
    if provider == "transformers":
        return TransformersVisionProvider(model)
    return None
