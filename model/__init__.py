"""The geographic mixture-of-experts model library: network, experts, conversion, importance."""
