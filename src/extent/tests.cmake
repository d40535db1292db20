agorafs_add_test(extent_test ${CMAKE_CURRENT_LIST_DIR}/extent_test.cc)
