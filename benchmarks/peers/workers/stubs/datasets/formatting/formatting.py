"""datasets.formatting.formatting.LazyRow, imported by llm-compressor 0.14 for type checks only."""


class LazyRow(dict):
    pass
