"""Human evaluation: a blind side-by-side study of two checkpoints (``python -m llm.human_eval``).

The pieces, in the order a study lives through them:

- :mod:`llm.human_eval.study`: read the prompts, generate both answers (or take the references), write the study
  directory (``study.json``, ``items.jsonl``) and read it back;
- :mod:`llm.human_eval.ratings`: the append-only, fsynced ``ratings.jsonl`` (one rating per rater and item);
- :mod:`llm.human_eval.server`: the rating page and its JSON API (FastAPI), blind by construction;
- :mod:`llm.human_eval.stats`: win rate with a bootstrap interval, Bradley-Terry, Cohen's kappa (``summary.json``).
"""
