"""Measuring quality: reconstruction metrics of a trained autoencoder (``reconstruction``), the quality of
generated samples (``sample_quality``), the Dice of samples against the masks they followed (``mask_metrics``),
the factor study of quality against compression (``factor_study``), the metric functions they share
(``metrics``) and the MedicalNet features and perceptual loss (``perceptual``)."""
