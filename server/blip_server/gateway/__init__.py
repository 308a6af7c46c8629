"""The typed gRPC gateway (`blip.caption.v1.CaptionService`) in front of the `blip_caption` ensemble."""
