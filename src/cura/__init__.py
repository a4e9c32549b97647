"""cura: fine-tune large language models on the hardware you have.

The QLoRA recipe (Dettmers et al. 2023, arXiv 2305.14314): a frozen base stored in 4-bit NormalFloat with
double quantization, LoRA adapters on every linear layer, a paged AdamW optimizer and gradient
checkpointing; around it a memory planner, a data pipeline that uses the model's own chat template,
evaluation before and after, and export to formats the ecosystem reads.
"""

from cura.errors import CuraError

__version__ = "0.1.0"

__all__ = ["CuraError", "__version__"]
