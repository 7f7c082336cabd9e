"""BibTeX entries of the papers the built-in methods implement, one constant per entry, combined into each method's
`citation` class attribute (`docs/methods.md` §13 lists which entry each component cites and which fields could not
be verified; the STRUCTURE entry lives with its regulariser, `StructureRegularizer.citation`), and the helpers the
model card uses to list the works a model cites.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_ENTRY_START = re.compile(r"^@\w+\{([^,\s]+),", re.MULTILINE)

CLIP = """@inproceedings{radford2021clip,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and
               Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and
               Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {139},
  pages     = {8748--8763},
  year      = {2021}
}"""

RELATIVE_REPRESENTATIONS = """@inproceedings{moschella2023relative,
  title     = {Relative Representations Enable Zero-Shot Latent Space Communication},
  author    = {Moschella, Luca and Maiorca, Valentino and Fumero, Marco and Norelli, Antonio and
               Locatello, Francesco and Rodol{\\`a}, Emanuele},
  booktitle = {International Conference on Learning Representations},
  year      = {2023},
  url       = {https://openreview.net/forum?id=SrC-nwieGJ}
}"""

ASIF = """@inproceedings{norelli2023asif,
  title     = {{ASIF}: Coupled Data Turns Unimodal Models to Multimodal without Training},
  author    = {Norelli, Antonio and Fumero, Marco and Maiorca, Valentino and Moschella, Luca and
               Rodol{\\`a}, Emanuele and Locatello, Francesco},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {36},
  year      = {2023}
}"""

PAL = """@misc{kim2026pal,
  title         = {Learning Relative Representations for Fine-Grained Multimodal Alignment with Limited Data},
  author        = {Kim, Shiwon and Park, Yu Rang},
  year          = {2026},
  eprint        = {2605.16834},
  archivePrefix = {arXiv}
}"""

CODIS = """@inproceedings{duan2022codis,
  title     = {Multi-Modal Alignment Using Representation Codebook},
  author    = {Duan, Jiali and Chen, Liqun and Tran, Son and Yang, Jinyu and Xu, Yi and Zeng, Belinda and
               Chilimbi, Trishul},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {15651--15660},
  year      = {2022}
}"""

SWAV = """@inproceedings{caron2020swav,
  title     = {Unsupervised Learning of Visual Features by Contrasting Cluster Assignments},
  author    = {Caron, Mathilde and Misra, Ishan and Mairal, Julien and Goyal, Priya and Bojanowski, Piotr and
               Joulin, Armand},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {33},
  pages     = {9912--9924},
  year      = {2020}
}"""

SAIL = """@inproceedings{zhang2025sail,
  title     = {Assessing and Learning Alignment of Unimodal Vision and Language Models},
  author    = {Zhang, Le and Yang, Qian and Agrawal, Aishwarya},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {14604--14614},
  year      = {2025}
}"""

FREEZE_ALIGN = """@inproceedings{maniparambil2025freezealign,
  title         = {Harnessing Frozen Unimodal Encoders for Flexible Multimodal Alignment},
  author        = {Maniparambil, Mayug and Akshulakov, Raiymbek and Djilali, Yasser Abdelaziz Dahou and
                   Narayan, Sanath and Singh, Ankit and O'Connor, Noel E.},
  booktitle     = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year          = {2025},
  eprint        = {2409.19425},
  archivePrefix = {arXiv}
}"""

CSA = """@inproceedings{li2025csa,
  title     = {{CSA}: Data-efficient Mapping of Unimodal Features to Multimodal Features},
  author    = {Li, Po-han and Chinchali, Sandeep and Topcu, Ufuk},
  booktitle = {The Thirteenth International Conference on Learning Representations},
  year      = {2025}
}"""

SET_TRANSFORMER = """@inproceedings{lee2019settransformer,
  title     = {Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks},
  author    = {Lee, Juho and Lee, Yoonho and Kim, Jungtaek and Kosiorek, Adam and Choi, Seungjin and Teh, Yee Whye},
  booktitle = {Proceedings of the 36th International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {97},
  pages     = {3744--3753},
  year      = {2019}
}"""


def join(*entries: str) -> str:
    """Several BibTeX entries as one `citation` string, separated by a blank line."""
    return "\n\n".join(entries)


def bibtex_entries(citation: str) -> list[tuple[str, str]]:
    """(key, entry) of each BibTeX entry of a `citation` string, in order; an entry starts with `@type{key,` at the
    start of a line and runs to the next one. Text before the first entry is refused (`ValueError`): a `citation`
    holds BibTeX only."""
    starts = [m.start() for m in _ENTRY_START.finditer(citation)]
    if citation.strip() and (not starts or citation[: starts[0]].strip()):
        raise ValueError(f"a citation must be BibTeX entries (each starting '@type{{key,'), got {citation[:60]!r}")
    bounds = zip(starts, starts[1:] + [len(citation)])
    return [(_ENTRY_START.match(citation, a).group(1), citation[a:b].strip()) for a, b in bounds]


def merge_citations(cited: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Components and their `citation` strings -> ([(component, its entry keys)] for those citing anything, every
    entry once in order of first mention). An entry cited twice (e.g. STRUCTURE by `mlp` and its regulariser) is
    listed once."""
    entries: dict[str, str] = {}
    keys_by_component = []
    for who, citation in cited:
        parsed = bibtex_entries(citation)
        for key, entry in parsed:
            entries.setdefault(key, entry)
        if parsed:
            keys_by_component.append((who, [key for key, _ in parsed]))
    return keys_by_component, list(entries.values())


def model_citations(model) -> dict[str, str] | None:
    """The Citation section of an `AlignerModel`'s card: `sentence` (which component cites which entry: the method,
    then each regulariser, by their `citation` attribute) and `bibtex` (every entry once). None when nothing is
    cited."""
    cited = [(f"the `{model.config.method}` aligner", type(model.aligner).citation)]
    cited += [(f"the `{name}` regulariser", type(module).citation) for name, module in model.regularizers.items()]
    keys_by_component, entries = merge_citations(cited)
    if not entries:
        return None
    clauses = "; ".join(f"{who} cites {', '.join(f'`{k}`' for k in keys)}" for who, keys in keys_by_component)
    return {
        "sentence": f"If you use this model, please cite the work it implements: {clauses}.",
        "bibtex": "\n\n".join(entries),
    }


__all__ = [
    "ASIF",
    "CLIP",
    "CODIS",
    "CSA",
    "FREEZE_ALIGN",
    "PAL",
    "RELATIVE_REPRESENTATIONS",
    "SAIL",
    "SET_TRANSFORMER",
    "SWAV",
    "bibtex_entries",
    "join",
    "merge_citations",
    "model_citations",
]
