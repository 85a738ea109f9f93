"""infusing_kit: knowledge-preserving fine-tuning of vision-language models, for teaching and analysis.

Reproduces "Infusing fine-grained visual knowledge to Vision-Language Models"
(Ypsilantis, Chen, Araujo, Chum; ICCV 2025 Workshops, arXiv 2508.12137) with open_clip in PyTorch.

Modules: world (built-in offline data), models (open_clip loading, preprocessing, embeddings),
pretrain (the toy VLM), losses, train (the training loop), metrics (retrieval), experiment (presets).
"""
__version__ = "0.1.0"
