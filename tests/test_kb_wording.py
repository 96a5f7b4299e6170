"""The LLM and VQA templates name a class by its prompt word (pcb1 -> "printed circuit board"), as the
learnable prompts do; descriptions stay stored under the folder name; old folder-name calls are not reused."""

import shutil
from pathlib import Path

import duckdb
import pytest

from kano.kb_builder import BuildConfig, build_knowledge_base, make_provider
from kano.knowledge_store import KnowledgeStore

DATA = Path(__file__).parent / "data" / "hazelnut_toy"
KEY = "sk-test-wording-0123456789"


@pytest.fixture
def two_images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for p in sorted((DATA / "test" / "colour").iterdir())[:2]:
        shutil.copy(p, d / p.name)
    return d


def _asked_word(request: dict) -> str:
    content = request["messages"][0]["content"]
    text = content if isinstance(content, str) else content[0]["text"]
    return text.split("class (", 1)[1].split(")", 1)[0]


def test_templates_get_the_prompt_word_and_storage_keeps_the_folder_name(tmp_path, fake_openai, two_images, cli, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("KANO_VQA_BASE_URL", raising=False)
    kb = tmp_path / "kb.duckdb"
    code, out, err = cli("kb", "build", "--classes", "pcb1,metal_nut", "--kb", kb, "--llm", "openai:gpt-3.5-turbo",
                         "--vqa", "openai:llama3.2-vision", "--vqa-base-url", fake_openai.url,
                         "--images", f"pcb1={two_images}", "--backoff", "0.01")
    assert code == 0, err
    assert sorted(_asked_word(r) for r in fake_openai.calls("llm")) == ["metal nut", "printed circuit board"]
    assert [_asked_word(r) for r in fake_openai.calls("vqa")] == ["printed circuit board"] * 2
    store = KnowledgeStore(kb)
    assert store.classes() == ["metal_nut", "pcb1"]
    assert len(store.descriptions("pcb1", ["llm"])) == 5 and len(store.descriptions("pcb1", ["vqa"])) == 2
    with duckdb.connect(str(kb), read_only=True) as con:
        rows = con.execute("SELECT DISTINCT class_name FROM calls").fetchall()
    assert sorted(r[0] for r in rows) == ["metal_nut", "pcb1"]
    # kb stats says that the wording changed and what happens to a KB built with folder names
    code, out, err = cli("kb", "stats", "--kb", kb)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "pcb1 -> 'printed circuit board'" in flat and "metal_nut -> 'metal nut'" in flat
    assert "not reused for the new wording (the call key includes the prompt)" in flat


def test_a_kb_built_with_folder_names_is_not_reused_for_the_new_wording(tmp_path, fake_openai, two_images):
    kb = KnowledgeStore(tmp_path / "kb.duckdb")
    llm = make_provider("openai:gpt-3.5-turbo", base_url=fake_openai.url, api_key=KEY, timeout_s=10)
    vqa = make_provider("openai:llama3.2-vision", base_url=fake_openai.url, api_key=KEY, timeout_s=10)
    images = {"pcb1": sorted(two_images.iterdir())}
    old = BuildConfig(classes=["pcb1"], llm="openai:gpt-3.5-turbo", vqa="openai:llama3.2-vision", images=images,
                      prompt_words={"pcb1": "pcb1"}, backoff_s=0.01)   # the wording of an earlier Kano
    build_knowledge_base(kb, old, llm, vqa)
    assert {_asked_word(r) for r in fake_openai.calls()} == {"pcb1"}
    n = len(fake_openai.requests)
    new = BuildConfig(classes=["pcb1"], llm="openai:gpt-3.5-turbo", vqa="openai:llama3.2-vision", images=images, backoff_s=0.01)
    assert new.prompt_words == {"pcb1": "printed circuit board"}
    report = build_knowledge_base(kb, new, llm, vqa)
    asked = fake_openai.requests[n:]
    # the VQA calls are made again with the new wording; the class already holds its 5 LLM descriptions
    assert [_asked_word(r) for r in asked] == ["printed circuit board"] * 2 and report.calls_reused == 0
    assert len(kb.descriptions("pcb1", ["vqa"])) == 4 and len(kb.descriptions("pcb1", ["llm"])) == 5
    # and a third run with the new wording reuses everything
    n = len(fake_openai.requests)
    build_knowledge_base(kb, new, llm, vqa)
    assert len(fake_openai.requests) == n
