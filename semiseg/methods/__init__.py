"""Every method, by paper name. An explicit dict: grep finds every use.

The method contract (DESIGN.md): a method is one module with
  Config                       frozen dataclass (subclass of config.MethodConfig), every field commented
  build(cfg, info)             -> dict of named nn.Modules ("model", "student", "teacher", ...)
  TRAINED, EVAL_NETS           nets the optimizer trains; nets evaluated (the best one is exported)
  USES_UNLABELED               whether the loop must stream unlabeled crops
  train_step(nets, batch, cfg, ctx) -> engine.loop.StepOut(loss, logs)
  after_step(nets, cfg, ctx)   optional: EMA teachers, queues
  run(cfg, run_dir)            optional: multi-stage methods compose engine.loop.fit several times
"""

from semiseg.methods import bst, ctt, dssn, fixmatch, st, supervised, swdbn, unimatch, unimatch_v2

METHODS = {
    "supervised": supervised,
    "fixmatch": fixmatch,
    "unimatch": unimatch,
    "dssn": dssn,
    "ctt": ctt,
    "swdbn": swdbn,
    "st": st,
    "stpp": st,  # ST++: the same module; Config.plus is derived from the name
    "bst": bst,
    "unimatch_v2": unimatch_v2,
}
