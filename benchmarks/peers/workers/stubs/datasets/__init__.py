"""A stand-in for Hugging Face `datasets` where it is not installed (the GPU machine: the real package needs pyarrow,
tens of MB of wheels). auto-round 0.16.1 and llm-compressor 0.14 import these names at start-up, but the benchmark
feeds them token ids (a list of tensors, a DataLoader), so no dataset code runs: anything that would is refused."""
IS_STUB = True


class _Refused:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("datasets is a stub here (benchmarks/peers/workers/stubs): the peer tried to build a "
                           "dataset; the benchmark feeds it token ids")


class Dataset(_Refused):
    pass


class DatasetDict(_Refused, dict):
    pass


class IterableDataset(_Refused):
    pass


class IterableDatasetDict(_Refused, dict):
    pass


class Features(_Refused, dict):
    pass


class Sequence(_Refused):
    pass


class Value(_Refused):
    pass


def _refuse(*args, **kwargs):
    _Refused()


load_dataset = concatenate_datasets = load_from_disk = interleave_datasets = _refuse
