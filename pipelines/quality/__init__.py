"""Quality you can measure beyond pixel distances: FID/KID with the standard FID Inception (`fid.py`), the
pix2pix paper's FCN-score with a segmenter trained on the dataset's real photos (`labels.py`,
`segmenter.py`, the `p2p segmenter train` job in `train_segmenter.py`), and labelled sample sheets
(`sheets.py`). `pipelines.registry.scoring` computes them in its one pass over a split."""
