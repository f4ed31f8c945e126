"""Everything disttrain does with ``torch.distributed``: the only package that imports it.

``env`` reads torchrun's environment, ``collectives`` joins the process group (or gives the null
object of one process), ``launcher`` runs the elastic agent, ``fsdp`` shards and checkpoints."""
