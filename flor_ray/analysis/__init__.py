"""Static analysis of a training script: how much of it must re-run to compute a log.

The replay engine restores checkpoints taken right after the last inner
``flor.loop`` of each outer iteration. In *skip* mode it runs the outer-level code
of every iteration, skips the inner loops and restores the checkpoint where the
last inner loop would exit; in *re-execute* mode the inner loops run for real from
the nearest checkpoint. Which mode a log statement needs is a question about data
flow, so this module answers it from the source alone (libcst, no execution):

* the script is linearised into *units* (simple statements and compound-statement
  headers) in execution order, with the chain of enclosing branches and loops of
  each unit; the function that holds the outer loop (``main()``...) is inlined at
  its module-level call, so that setup, the loop and the code after it form one
  sequence;
* every unit knows the names it reads, the names it rebinds (*strong* definitions,
  which kill older values) and the objects it may mutate (*weak* definitions:
  ``hist.append(x)``, ``x[i] = v``, ``opt.step()``, calls of script functions that
  mutate their arguments or globals);
* a backward slice from the log statement follows reaching definitions, including
  loop back edges; a definition reached through the outer loop's back edge is a
  *loop-carried* value. Checkpoints capture the plain ones (and generators, loader
  positions); the planner checks that the checkpoints it restores hold every
  carried name the statement reads and, when iterations re-execute, every one the
  training code reads (:attr:`ScriptAnalysis.training_carried`: the slice of each
  write of checkpointed state, where ``loss.backward()`` writes the models'
  gradients and ``g["lr"] = lr`` in ``for g in opt.param_groups`` writes ``opt``);
* skip mode restores a checkpoint where the last inner loop exits (at the end of
  an iteration without inner loops); outer-level code before that point runs on
  state nothing restored, so a statement there that reads checkpointed or
  loop-carried state re-executes the iteration from the checkpoint before it.

Everything here errs towards re-execution: skipping wrongly yields wrong values,
re-executing wrongly only costs time. Each :class:`Need` says why in a sentence
that ``explain()`` can print.

The parts, in the order a script goes through them: :mod:`.calls` (the one
recogniser of flor calls, shared with propagation), :mod:`.scan` (what an
expression reads and calls), :mod:`.units` (the linearised statements),
:mod:`.summaries` (what calling a script function does), :mod:`.slicing`
(reaching definitions, loop-carried values), :mod:`.needs` (skip or re-execute,
and why), :mod:`.analyzer` (the composition) and :mod:`.results` (the values
returned).
"""

from .analyzer import analyze
from .results import LogSite, Need, NeedKind, ScriptAnalysis, UnknownLogNameError

__all__ = [
    "LogSite",
    "Need",
    "NeedKind",
    "ScriptAnalysis",
    "UnknownLogNameError",
    "analyze",
]
