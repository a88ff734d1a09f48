"""RAG over a company's own documents: index files, search them (hybrid dense + keyword), answer with citations.

from phi3fast.rag import Index
index = Index.build(["manuals/"], "manuals.idx")      # or Index.open("manuals.idx")
for r in index.search("What does fault E-042 mean?", k=5):
    print(r.rank, r.source, r.heading, r.score)
"""

from phi3fast.rag.index import BuildStats, Index, SearchResult

__all__ = ["BuildStats", "Index", "SearchResult"]
