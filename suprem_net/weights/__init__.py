"""suprem_net.weights"""
