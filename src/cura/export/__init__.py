"""Ship a fine-tune: merge the adapter into its base (transformers safetensors) and export GGUF for
llama.cpp / Ollama, keeping the chat template the adapter was trained with.

report = merge("smollm2-135m", "run/adapter", "run/merged")          # + parity check vs adapter-on-base
report = export_gguf("run/merged", "run/model.gguf", out_type="q8_0") # + Modelfile, read-back check
warning = check_template("run/adapter", tokenizer)                     # None when the templates agree
"""

from cura.export.gguf import ExportReport, export_gguf, permute_qk
from cura.export.merge import MergeReport, merge, verify_merge
from cura.export.template import TemplateStyle, check_template, detect_style, modelfile_text

__all__ = [
    "ExportReport",
    "MergeReport",
    "TemplateStyle",
    "check_template",
    "detect_style",
    "export_gguf",
    "merge",
    "modelfile_text",
    "permute_qk",
    "verify_merge",
]
