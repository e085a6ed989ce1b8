"""suprem_net.planning"""
