"""Every method, by paper name. An explicit dict: grep finds every use."""

from semiseg.methods import supervised

METHODS = {
    "supervised": supervised,
}
