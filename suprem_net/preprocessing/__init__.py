"""suprem_net.preprocessing"""
