"""suprem_net.evaluation"""
