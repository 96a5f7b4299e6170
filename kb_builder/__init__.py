"""Building the LLM-VQA knowledge base: the paper's templates, providers and build orchestration.

Writes through `knowledge_store`; holds no SQL.
"""

from .build import BuildConfig, BuildReport, build_knowledge_base, call_key
from .builtin import builtin_classes, builtin_descriptions
from .prompts import LLM_TEMPLATE, VQA_TEMPLATE, clean_vqa_reply, is_refusal, llm_prompt, parse_descriptions, vqa_prompt
from .providers import OpenAIChatProvider, Provider, ProviderError, Reply, TransformersVisionProvider, make_provider, parse_spec

__all__ = ["BuildConfig", "BuildReport", "LLM_TEMPLATE", "OpenAIChatProvider", "Provider", "ProviderError", "Reply",
           "TransformersVisionProvider", "VQA_TEMPLATE", "build_knowledge_base", "builtin_classes", "builtin_descriptions",
           "call_key", "clean_vqa_reply", "is_refusal", "llm_prompt", "make_provider", "parse_descriptions", "parse_spec",
           "vqa_prompt"]
