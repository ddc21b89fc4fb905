"""Synthetic FABA data: AU-driven cartoon faces, their landmarks and GPT-style descriptions.

- `faces`: the parametric face, its 68 landmarks and the renderer.
- `descriptions`: emotion and AU answers written from the emotion and the active AUs.
- `generate`: writes a dataset in the FABA-Instruct layout (`generate_dataset`, `render_grid`).
"""
