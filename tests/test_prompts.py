from kano.kb_builder import LLM_TEMPLATE, VQA_TEMPLATE, clean_vqa_reply, is_refusal, llm_prompt, parse_descriptions, vqa_prompt


def test_templates_are_the_papers_verbatim():
    assert LLM_TEMPLATE.format(class_name="fabric") == "Q: Describe what an abnormal image of class (fabric) looks like?"
    assert VQA_TEMPLATE.format(class_name="fabric") == (
        "Q: Identify anomalies in the input image of the specified class (fabric). "
        "Describe each anomaly's location, color, shape, size, and other characteristics.")
    assert llm_prompt("bottle", 3).startswith("Q: Describe what an abnormal image of class (bottle) looks like?")
    assert "3 different descriptions" in llm_prompt("bottle", 3)
    assert vqa_prompt("bottle") == VQA_TEMPLATE.format(class_name="bottle")


def test_parse_numbered_list_with_header():
    reply = "Here are five descriptions:\n1. A bottle with a cracked rim near the top.\n2) A bottle with a dark stain on the glass.\n\n3. A bottle missing part of its neck entirely."
    assert parse_descriptions(reply) == ["A bottle with a cracked rim near the top.", "A bottle with a dark stain on the glass.",
                                         "A bottle missing part of its neck entirely."]


def test_parse_bullets_and_markdown_bold():
    reply = "- **Cracks**: thin dark lines across the surface of the tile\n* Stains of brown colour over the glaze\n• Chipped corners where the tile is broken"
    out = parse_descriptions(reply)
    assert out == ["Cracks: thin dark lines across the surface of the tile", "Stains of brown colour over the glaze",
                   "Chipped corners where the tile is broken"]


def test_parse_json_list_and_object():
    assert parse_descriptions('["a fabric with a hole in it", "a fabric with a faded patch"]') == [
        "a fabric with a hole in it", "a fabric with a faded patch"]
    assert parse_descriptions('```json\n{"descriptions": ["a fabric with a hole in it", "a fabric with loose threads"]}\n```') == [
        "a fabric with a hole in it", "a fabric with loose threads"]


def test_parse_prose_sentences_and_duplicates():
    reply = "An abnormal fabric may show faded areas. It can have holes in the weave. An abnormal fabric may show faded areas."
    assert parse_descriptions(reply) == ["An abnormal fabric may show faded areas.", "It can have holes in the weave."]


def test_refusals_and_empty_give_nothing():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("As an AI, I cannot see images.")
    assert not is_refusal("A hazelnut with a crack.")
    assert parse_descriptions("I'm sorry, I cannot do that.") == []
    assert parse_descriptions("") == []
    assert parse_descriptions("   \n ") == []
    assert clean_vqa_reply("Sorry, I can't identify anything.") is None


def test_clean_vqa_reply_joins_lines():
    assert clean_vqa_reply("1. A dark spot at the top left.\n2. A scratch in the centre of the nut.") == \
        "A dark spot at the top left. A scratch in the centre of the nut."
    assert clean_vqa_reply("ok") is None
