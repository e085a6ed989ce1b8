"""suprem_net.data"""
