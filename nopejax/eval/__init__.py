"""Evaluation past the training length, one module per kind: text loss by position and length
(`loss_by_length`), synthetic-task exact match (`tasks`), passkey retrieval (`passkey`); `stats`
runs a checkpoint on its mesh, `command` is `nopejax eval-length`."""
