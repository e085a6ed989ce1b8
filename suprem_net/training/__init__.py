"""suprem_net.training"""
