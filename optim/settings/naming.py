"""Names of a model's parameters, by walking it (duck typing: no Thinc or spaCy import).

Two namings of the same walk: the stable name a checkpoint saves state under (nodes
counted: `tagger/2/W`) and the path per-parameter groups match (nodes named:
`tagger/softmax/W`). Used by optim.checkpoint and by `Optimizer.bind`.
"""
from typing import Any, Dict, Iterator, List, Tuple


def param_names(obj: Any) -> Dict[Any, str]:
    """`{optimizer key: stable name}` for every parameter of a Thinc model or of every
    component of a spaCy pipeline, in walk order (a node shared by two components is
    named by the first)."""
    return {key: name for key, name, _, _ in _named_params(obj)}


def param_paths(obj: Any) -> Dict[Any, str]:
    """`{optimizer key: path}` for every parameter, as per-parameter groups match them:
    `<node name>/<param>` in a Thinc model, `<component>/<node name>/<param>` in a spaCy
    pipeline; a PyTorch shim's parameters by their own names under their node."""
    return {key: path for key, _, _, path in _named_params(obj, declared=True)}


def param_shapes(obj: Any) -> Dict[str, List[int]]:
    """`{stable name: shape}` of the node parameters of `obj` (what a checkpoint of it
    holds), for telling a checkpoint of another model from one of this model."""
    return {name: list(node.get_param(key[1]).shape)
            for key, name, node, _ in _named_params(obj) if node is not None}


def _named_params(obj: Any, declared: bool = False) -> Iterator[Tuple[Any, str, Any, str]]:
    """`(key, stable name, node, path)` of every parameter, in walk order, each key
    once: a node's PyTorch shims' parameters (node None: their arrays are torch's)
    first, then the node's own. The stable name counts nodes (`tagger/2/W`); the path
    names them (`tagger/softmax/W`), for people. declared=True: a node's declared
    parameters too, before the model is initialized."""
    if hasattr(obj, "components") and hasattr(obj, "pipe_names"):
        models = [(f"{component}/", proc.model) for component, proc in obj.components
                  if hasattr(getattr(proc, "model", None), "walk")]
    elif hasattr(obj, "walk"):
        models = [("", obj)]
    else:
        raise TypeError(f"expected a Thinc Model or a spaCy Language, got "
                        f"{type(obj).__name__}")
    seen = set()
    for prefix, model in models:
        for index, node in enumerate(model.walk()):
            found = []
            for j, shim in enumerate(getattr(node, "shims", ())):
                torch_model = getattr(shim, "_model", None)
                if hasattr(torch_model, "named_parameters"):
                    found += [((shim.id, pname), f"{prefix}{index}/shim{j}/{pname}", None,
                               f"{prefix}{node.name}/{pname}")
                              for pname, _ in torch_model.named_parameters()]
            found += [((node.id, pname), f"{prefix}{index}/{pname}", node,
                       f"{prefix}{node.name}/{pname}")
                      for pname in node.param_names if declared or node.has_param(pname)]
            for key, name, owner, path in found:
                if key not in seen:
                    seen.add(key)
                    yield key, name, owner, path
