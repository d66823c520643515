"""Studies: the fair-comparison protocol as a config (`conf/study/<name>.yaml`, docs/studies.md).

- `spec`    the study config: its language, checked against the training config before any job
- `plan`    the jobs of each stage (grid cells, seeds, best cells, neighbours), their names
- `runner`  `run` (one Hydra multirun per phase, through any Hydra launcher) and `status`
- `stats`   the paired comparison: median, bootstrap interval, Wilcoxon signed-rank p-value
- `report`  the markdown report and its figures, from the run summaries alone
"""
