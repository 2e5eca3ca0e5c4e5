"""Everything about the model; nothing of FAISS or HTTP.

- `backbones`, `families`: the registry of backbones, their weights and preprocessing
- `network`: trunk -> GAP -> optional projection -> L2-normalised embedding, classifier on top
- `images`, `data`: decoding images safely; folders, classes, the decode/resize/crop policy
- `config`, `training`, `trainer`, `cluster`: fine-tuning (LP-FT), one process or torchrun
- `bundle`, `layout`, `files`: a trained model on disk and `Bundle.encode`, the one forward path
- `evaluation`, `metrics`, `report`: held-out accuracy and retrieval, and the report page
- `samples`: the generated shapes the demo and the tests use
"""
