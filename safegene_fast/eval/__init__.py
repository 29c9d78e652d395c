"""Evaluation, the floor the method and the model families stand on: loading and greedy generation
(``generate``), the judges (``judge``), and the offline data sets (``data``)."""
