"""The methods: the regularizers as one table of terms and the inputs they compare against, their formulas, the teacher, LoRA, post-hoc weight-space methods and where the tower changed."""
