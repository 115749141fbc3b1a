"""Evaluation of frozen backbones.

features   CLS / mean-patch features of a labelled pool (eval transform, bf16, across ranks)
knn        weighted k-NN (DINO protocol), chunked over queries and bank
linear     linear probe with a batched learning-rate x weight-decay grid
dense      linear segmentation and depth probes on patch features (train, choose, score across ranks)
patch_features  per-patch features of a backbone or of raw pixels, for images with dense targets
dense_data images with VOC-style label masks and depth maps; bad targets counted and reported
segmentation, depth   their losses and metrics (mIoU, pixel accuracy; RMSE, δ1, AbsRel)
visualize  PCA-of-patches and CLS-attention montages, predicted masks and depth
report     metrics plots and JSON / Markdown / self-contained HTML reports
evaluate   the protocols on a backbone and two image folders; online k-NN; k-NN over checkpoints
cli        `dinoscale eval knn|linear|dense|visualize|report`

Submodules are imported where used (plots pull in matplotlib, which training does not need).
"""
