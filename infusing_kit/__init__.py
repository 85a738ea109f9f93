"""infusing_kit: knowledge-preserving fine-tuning of vision-language models, for teaching and analysis.

Reproduces "Infusing fine-grained visual knowledge to Vision-Language Models"
(Ypsilantis, Chen, Araujo, Chum; ICCV 2025 Workshops, arXiv 2508.12137) with open_clip in PyTorch.

The floor plan: a core of modules here, and five wings (sub-packages) by concern. A module imports only what sits
on a lower line of this map, its own wing's lower lines included (tests/test_layers.py checks it; CONTRIBUTING.md).

core (infusing_kit/)
  checkpoints distributed   files written so that nothing a user made is lost; data parallel runs under torchrun
  budget      metrics       a long job's --budget and values runs share; retrieval metrics (brute-force tested)
  losses      towers        the classifier head and CLIP's loss; one surface over ViT, ConvNeXt and ResNet towers
  weightfiles hfweights     weight files checked; transformers' CLIP / SigLIP checkpoints in open_clip's names
  datasets/                 (the wing below)
  world/                    (the wing below)
  models      pretrain      open_clip loading and embeddings; the toy VLM (shipped weights) and its pretraining
  identity                  what a run is (starting weights, threads, device, code)
  methods/                  (the wing below)
  trainconfig run_state     a run's settings (checked when made); its counters, kept checkpoint and files
  train       evaluation    the one training loop; a run's test and validation metrics
  protocol/   teaching/     (the wings below)
  __main__                  the command line (`python -m infusing_kit --help`)

datasets/   the data: nothing above the core's first lines
  data        sampling      labelled image sets (memory, folders, CSV, split files); the batches of each step
  containers                an experiment's data (Domains), a query/gallery split, an image-text probe
  records     textprobe     the paper's released records (ArrayRecord, TFRecord), read without TensorFlow; its
                            image-text test sets with precomputed text embeddings
  leakage     precheck      leakage checks; a config's data checked before any work (records decoded, positives)
world/      the built-in offline world
  vocab       heldout       its vocabulary, captions and tokenizer; how its held-out generic combinations are drawn
  (world/__init__)          the world itself: renders, splits, the near and far worlds, `domains`
methods/    what the kit compares
  regularizers terms        the regularizers' formulas; as one table of where each acts (TERMS)
  teacher     inputs        pre-extracted teacher embeddings; what the terms compare against (INPUTS)
  lora        drift         LoRA factors on the image tower; where the tower changed, block by block
  merges      posthoc       weight-space merges (WiSE-FT, LiNeS, Model Stock, soups); post-hoc methods as one table
protocol/   from one experiment to the whole comparison
  presets     testsets      the methods the kit compares (PRESETS); a config's extra test sets and their mean
  registry                  the results registry: a row per finished run (row_of), written and read back
  experiment                one experiment: model -> fine-tune -> evaluate (metrics.json, the registry)
  formats                   the data formats a config may name (FORMATS) and its typed-key checks
  config      resolve       real runs from a TOML file; a config or study file checked and shown without its data
  runners                   the one setup factory: a method, a seed, overrides -> an experiment (presets, study files)
  spaces      storage       search ranges and the constraint rule; SQLite or a shared database
  study       fingerprint   the protocol on a study file; what a study or comparison was made on
  choices     calibration   what a finished study chose; the schedule length and seed noise from naive's curves
  trials                    a study's trials run: the objective, worker processes, other machines' trials awaited
  search      results       Optuna searches on validation; registries, paired intervals, tables
  comparison  export        the whole comparison, resumable; the built-in world as files
teaching/   the course
  figures     course        figures shared by notebooks and reports; goals, questions, exercises, the syllabus
  chapters    explorer      a chapter's runs, on the built-in world or your study file; the widget explorer
  site        notebook_runner  the static course site; the chapters headless (papermill)
"""
__version__ = "0.1.0"
