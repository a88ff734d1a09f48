"""RAG over a company's own documents: index files, search them (hybrid dense + keyword), answer with citations.

from phi3fast.rag import Index
index = Index.build(["manuals/"], "manuals.idx")      # or Index.open("manuals.idx")
for r in index.search("What does fault E-042 mean?", k=5):
    print(r.rank, r.source, r.heading, r.score)

Rooms: readers.py (files to text) · chunking.py · embedders/ · stores/ (built-in SQLite + HNSW, Milvus) ·
manifest.py · build.py · index.py (open, search, fusion) · rerank.py · answer.py (prompt and citations).
"""

from phi3fast.rag.index import BuildStats, Index, SearchResult

__all__ = ["BuildStats", "Index", "SearchResult"]
