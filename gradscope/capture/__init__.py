"""gradscope.capture: from the training loop to rows of the device buffer.

``target`` checks and unwraps what ``watch()`` is handed; ``layout`` names the parameters and their
layers; ``step`` is the hot path (optimizer hooks, the step record, moments into the buffer, the
flush's hand-over to the frame); ``order`` learns the forward order; ``activations`` measures
activation modules on sampled steps; ``distributed`` makes rows global across ranks; ``hooks`` owns
every hook handle.
"""
