"""The in-process transformers VQA provider on a tiny random-weight Mllama built from a config."""

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from kano.core.errors import KanoError
from kano.knowledge_store import KnowledgeStore

DATA = Path(__file__).parent / "data" / "hazelnut_toy"


def tiny_mllama(folder: Path) -> Path:
    """Save a tiny Mllama and a processor (tokenizer built offline with `tokenizers`) to folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor, PreTrainedTokenizerFast

    words = ("the a hazelnut has small dark spot crack near top left right of shell q identify anomalies in input image "
             "specified class describe each anomaly's location color shape size and other characteristics . ( ) , :").split()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|python_tag|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + words + ["user", "assistant"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="[UNK]",
                                   pad_token="<|end_of_text|>")
    fast.add_special_tokens({"additional_special_tokens": specials[2:7]})
    template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}")
    proc = MllamaProcessor(MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2), fast, chat_template=template)
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
                           vision_output_dim=32 * 3, image_size=32, patch_size=16, max_num_tiles=2, intermediate_layers_indices=[0, 1],
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, cross_attention_layers=[1], max_position_embeddings=512, bos_token_id=0,
                         eos_token_id=vocab["<|eot_id|>"], pad_token_id=1),
        image_token_index=vocab["<|image|>"])
    torch.manual_seed(0)
    MllamaForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory):
    return tiny_mllama(tmp_path_factory.mktemp("mllama"))


def test_provider_generates_from_a_saved_tiny_mllama(mllama_dir):
    from kano.kb_builder import TransformersVisionProvider

    p = TransformersVisionProvider(str(mllama_dir))
    buf = io.BytesIO()
    Image.new("RGBA", (40, 30), (100, 50, 20, 255)).save(buf, format="PNG")
    r = p.complete("Q: Identify anomalies in the input image of the specified class (hazelnut).", buf.getvalue(),
                   {"temperature": 0.0, "max_tokens": 12, "seed": 0})
    assert r.served_model == str(mllama_dir) and r.input_tokens > 5 and 0 < r.output_tokens <= 12
    assert isinstance(r.text, str) and r.text.strip()
    again = p.complete("Q: Identify anomalies in the input image of the specified class (hazelnut).", buf.getvalue(),
                       {"temperature": 0.0, "max_tokens": 12, "seed": 0})
    assert again.text == r.text  # greedy decoding is deterministic


def test_kb_build_with_the_transformers_provider(mllama_dir, tmp_path, cli):
    kb = tmp_path / "kb.duckdb"
    code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", kb, "--vqa", f"transformers:{mllama_dir}", "--images",
                         f"hazelnut={DATA / 'test' / 'good'}", "--concurrency", "2")
    # random weights may emit fewer than 4 words for an image: such replies are failed calls, retried, then reported
    store = KnowledgeStore(kb)
    vqa = store.descriptions("hazelnut", ["vqa"])
    assert len(vqa) >= 1 and code == (0 if len(vqa) == 6 else 1), err
    with store.connect(read_only=True) as con:
        row = con.execute("SELECT provider, requested_model, input_tokens > 0 FROM calls WHERE status = 'ok' LIMIT 1").fetchone()
    assert row == ("transformers", str(mllama_dir), True)


def test_four_bit_needs_cuda_and_says_so():
    from kano.kb_builder import TransformersVisionProvider

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = TransformersVisionProvider("meta-llama/Llama-3.2-11B-Vision-Instruct", quantize="4bit")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with pytest.raises(KanoError, match="must run on a CUDA GPU"):
        p.complete("Q", buf.getvalue(), {})
    with pytest.raises(KanoError, match="quantize must be one of"):
        TransformersVisionProvider("x", quantize="8bit")
