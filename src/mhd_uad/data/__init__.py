"""Data: the layout and split CSVs (splits), per-scan preprocessing (preprocess) and the prepare stage's
memory-mapped sets (prepared), scan geometry and the way back to source space (geometry), the training
DataModule (datamodule), and the offline demo dataset (demo/)."""
