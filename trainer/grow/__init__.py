"""8. Grow the dataset: one image → candidates → the user picks → a larger set for the next round.

The practitioners' loop (docs/PRACTICE.md §10): a one-image LoRA (or a reference-editing model, before any training)
renders the subject in the views, poses and light the one picture lacks; the user keeps the few good ones; the next
round trains on the original picture(s) plus those. This package plans the candidates (``variations``), renders them
into a folder in the ``--dataset`` layout with each one's provenance (``candidates``), and records how rounds link
(``lineage``). It knows nothing of the page; ``trainer.api`` exports what the page calls.
"""
