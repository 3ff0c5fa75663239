"""Evaluation: IR metrics (pytrec_eval), ``RetrievalEvaluator`` and the Hugging Face ``evaluate`` metric
shipped in the package.
"""
