"""Evaluation of the four ways to answer (base, rag, ft, ft+rag) on a labelled question set, and the RAG
training rows (`rag_data`) that teach an adapter to read retrieved passages."""

from phi3fast.eval.questions import Question, load_questions
from phi3fast.eval.runner import EvalConfig, parse_modes, run_eval

__all__ = ["EvalConfig", "Question", "load_questions", "parse_modes", "run_eval"]
