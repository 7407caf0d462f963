"""``unlearn-kernels demo``: a fictitious-author world, its base models and the unlearning
methods scored with the field's metrics, on a CPU in minutes (DESIGN §7)."""

#: The methods the demo runs, in its table's order.
METHOD_NAMES = ("ngdiff", "ga", "graddiff", "yao", "npo", "simnpo")
