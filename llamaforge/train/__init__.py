"""Training: the one training loop (`trainer`), run configs that map onto YAML and flags
(`runconfig`), the recipes that feed it (`classify`, `sft`, `pretrain`, found by name in
`recipes`, sharing `base`), and `reproduce`, which reruns a run from its model card."""
