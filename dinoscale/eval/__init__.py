"""Evaluation of frozen backbones.

features   CLS / mean-patch features of a labelled pool (eval transform, bf16, across ranks)
knn        weighted k-NN (DINO protocol), chunked over queries and bank
linear     linear probe with a batched learning-rate x weight-decay grid
visualize  PCA-of-patches and CLS-attention montages
report     metrics plots and JSON / Markdown / self-contained HTML reports
evaluate   the protocols on a backbone and two image folders; online k-NN; k-NN over checkpoints
cli        `dinoscale eval knn|linear|visualize|report`

Submodules are imported where used (plots pull in matplotlib, which training does not need).
"""
