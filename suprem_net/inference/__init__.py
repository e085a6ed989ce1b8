"""suprem_net.inference"""
