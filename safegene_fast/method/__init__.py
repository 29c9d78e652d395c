"""What SafeGene adds on top of the streamed passes: the gene on a loaded model through the low-rank
path (``patch``), data-aware layer selection, few-shot coefficient recalibration, and the baselines
it is compared with."""
