"""The Gradio app: one module per step of the flow, plus a pure event → view mapping (``view.py``)."""
