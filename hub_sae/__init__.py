"""hub-sae: TopK sparse autoencoders on the hidden states of diffusion language models."""

from hub_sae.sae import EncoderOutput, ForwardOutput, TopKSAE

__all__ = ["EncoderOutput", "ForwardOutput", "TopKSAE"]
