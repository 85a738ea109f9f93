"""infusing_kit: knowledge-preserving fine-tuning of vision-language models, for teaching and analysis.

Reproduces "Infusing fine-grained visual knowledge to Vision-Language Models"
(Ypsilantis, Chen, Araujo, Chum; ICCV 2025 Workshops, arXiv 2508.12137) with open_clip in PyTorch.

The modules, from the data to the comparison (each one's docstring says what it holds):

  data       sampling     labelled image sets (memory, folders, CSV, split files); the batches of each step
  world      vocab        the built-in offline world; its vocabulary, captions and tokenizer
  heldout                 how its held-out generic combinations are drawn (validation built like the test)
  models     towers       open_clip loading and embeddings; one surface over ViT, ConvNeXt and ResNet towers
  pretrain   teacher      the toy VLM (shipped weights); pre-extracted teacher embeddings
  losses     terms        the classifier head; the regularizers as one table (TERMS) ...
  inputs     regularizers ... what they compare against (INPUTS), and their formulas
  lora                    LoRA factors on the image tower
  trainconfig run_state   a run's settings (checked when made); its counters, kept checkpoint and files
  train                   the one training loop
  metrics    drift        retrieval metrics (brute-force tested); where the tower changed, block by block
  evaluation              a run's test and validation metrics (query/gallery, merged index, precomputed text)
  testsets                a config's extra test sets ([data.tests]) and the mean over datasets (the official average)
  posthoc    merges       post-hoc methods as one table; their weight-space merges (WiSE-FT, LiNeS, Model Stock, soups)
  presets    experiment   the methods the kit compares (PRESETS); one experiment: model -> fine-tune -> evaluate
  config     leakage      real runs from a TOML file; leakage checks before any work
  precheck   weightfiles  a config's data checked before any work (records decoded, positives); weight files checked
  hfweights               transformers' CLIP / SigLIP checkpoints (folder, .safetensors, .bin) in open_clip's names
  records    textprobe    the paper's released records (ArrayRecord, TFRecord), read without TensorFlow; its
                          image-text test sets with precomputed text embeddings
  resolve                 a config or study file checked and its settings shown, without its data
  search     study        Optuna searches on validation; the protocol on a study file
  choices    calibration  what a finished study chose; the schedule length and seed noise from naive's curves
  spaces     storage      search ranges, extensions, transitions, the constraint rule; SQLite or a shared database
  fingerprint             what a study or comparison was made on (model, data, fixed fields): a change is refused
  comparison results      the whole comparison, resumable; registries, paired intervals, tables
  budget                  a long job's --budget, its resumable state in a tracked folder, values runs share
  figures    explorer     figures shared by notebooks and reports; the widget explorer
  export     distributed  the built-in world as files; data parallel runs under torchrun
  checkpoints identity    files written so that nothing a user made is lost; what a run is (weights, threads, code)
  chapters   notebook_runner  a chapter's runs, on the built-in world or your study file; the chapters headless
  site                    (papermill); the static course site (chapters, index, syllabus, reference pages)
  course                  the chapters' teaching layer (goals, questions, exercises), clean copies, the syllabus
  __main__                the command line (`python -m infusing_kit --help`)
"""
__version__ = "0.1.0"
